"""Expert variants the loaded model types need: gpt-oss's clamped SwiGLU and Llama 4's gate weight
on the expert's input, checked by hand and against the masked reference loop."""

from __future__ import annotations

import torch

from moekit.config import MoEConfig
from moekit.layers.experts import clamped_swiglu
from moekit.layers.moe import MoE


def test_clamped_swiglu_hand_worked():
    h1 = torch.tensor([-1.0, 0.5, 9.0])
    h3 = torch.tensor([2.0, -9.0, 0.25])
    got = clamped_swiglu(h1, h3, alpha=1.702, limit=7.0)
    g = torch.tensor([-1.0, 0.5, 7.0])  # gate clamped above only
    u = torch.tensor([2.0, -7.0, 0.25])  # up clamped both ways
    torch.testing.assert_close(got, g * torch.sigmoid(1.702 * g) * (u + 1))


def test_scaling_the_expert_input_is_not_scaling_its_output():
    """With the gate weight on the input, a token's output is expert(w x), checked by hand."""
    cfg = MoEConfig(n_routed_experts=3, top_k=1, expert_ffn_dim=8, score_func="sigmoid", norm_topk_prob=False)
    moe = MoE(MoEConfig(**{**cfg.__dict__, "scale_expert_input": True}), 6, impl="loop")
    x = torch.randn(5, 6)
    with torch.no_grad():
        y, routing = moe(x)
        ref = MoE(MoEConfig(**{**cfg.__dict__, "scale_expert_input": True}), 6, impl="reference")
        ref.load_state_dict(moe.state_dict())
        torch.testing.assert_close(ref(x)[0], y)
        ex = moe.experts
        for t in range(5):
            e, w = routing.idx_TK[t, 0].item(), routing.weights_TK[t, 0]
            h = w * x[t]
            want = (torch.nn.functional.silu(ex.w1[e] @ h) * (ex.w3[e] @ h)) @ ex.w2[e].T
            torch.testing.assert_close(y[t], want)


def test_clamped_swiglu_experts_agree_with_the_reference_loop_and_skip_the_fused_path():
    """The fused path's hand-written backward knows only silu: with another unit it runs the loop."""
    cfg = MoEConfig(
        n_routed_experts=4, top_k=2, expert_ffn_dim=6, expert_bias=True, router_bias=True,
        expert_activation="clamped_swiglu", swiglu_limit=0.3,
    )  # fmt: skip
    moe = MoE(cfg, 8, impl="fused")
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.5)
    assert moe.experts.resolved_impl(torch.randn(2, 8)) == "loop"
    ref = MoE(cfg, 8, impl="reference")
    ref.load_state_dict(moe.state_dict())
    x = torch.randn(7, 8)
    torch.testing.assert_close(moe(x)[0], ref(x)[0])
