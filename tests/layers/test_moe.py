"""The MoE layer against a plain per-token reference written here, forward and backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moekit.config import MoEConfig
from moekit.layers.mlp import FeedForward
from moekit.layers.moe import MoE


def per_token_reference(moe: MoE, x_TD: torch.Tensor) -> torch.Tensor:
    """Loop over tokens and their chosen experts: the definition of an MoE layer."""
    cfg = moe.cfg
    logits = x_TD.float() @ moe.router.gate.weight.float().T
    scores = logits.softmax(-1) if cfg.score_func == "softmax" else logits.sigmoid()
    ex = moe.experts
    rows = []
    for t in range(x_TD.shape[0]):
        chosen = scores[t].topk(cfg.top_k).indices
        w = scores[t, chosen]
        if cfg.norm_topk_prob:
            w = w / w.sum()
        w = w * cfg.routed_scaling_factor
        y = torch.zeros_like(x_TD[t])
        for e, g in zip(chosen.tolist(), w, strict=True):
            h = F.silu(ex.w1[e] @ x_TD[t]) * (ex.w3[e] @ x_TD[t])
            y = y + g * (ex.w2[e] @ h)
        if moe.shared_experts is not None:
            s = moe.shared_experts(x_TD[t])
            if moe.shared_gate is not None:
                s = torch.sigmoid(moe.shared_gate(x_TD[t])) * s
            y = y + s
        rows.append(y)
    return torch.stack(rows)


CASES = [
    dict(n_routed_experts=8, top_k=2, expert_ffn_dim=16),  # Mixtral-like
    dict(n_routed_experts=16, top_k=4, expert_ffn_dim=8, n_shared_experts=2, norm_topk_prob=False),  # DeepSeekMoE
    dict(n_routed_experts=6, top_k=3, expert_ffn_dim=8, n_shared_experts=1, shared_expert_gate=True),  # Qwen2-MoE
    dict(n_routed_experts=8, top_k=2, expert_ffn_dim=8, score_func="sigmoid", routed_scaling_factor=2.5),
    dict(n_routed_experts=5, top_k=1, expert_ffn_dim=8),
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("impl", ["fused", "loop", "reference"])  # fused: the local fast path
def test_moe_matches_per_token_reference(case, impl):
    torch.manual_seed(1)
    moe = MoE(MoEConfig(**case), d_model=12, impl=impl)
    x = torch.randn(2, 7, 12, requires_grad=True)
    y, routing = moe(x)
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = per_token_reference(moe, x_ref.view(-1, 12)).view_as(y)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    # Gradients of the input and every parameter agree too.
    g = torch.randn_like(y)
    params = [p for p in moe.parameters()]
    grads = torch.autograd.grad(y, [x, *params], g, allow_unused=True)
    grads_ref = torch.autograd.grad(y_ref, [x_ref, *params], g, allow_unused=True)
    for a, b in zip(grads, grads_ref, strict=True):
        if b is None:
            assert a is None or torch.count_nonzero(a) == 0
        else:
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert routing.counts_E.sum() == 14 * case["top_k"]
    assert routing.idx_TK.shape == (14, case["top_k"])


def test_one_expert_top1_equals_dense_ffn():
    moe = MoE(MoEConfig(n_routed_experts=1, top_k=1, expert_ffn_dim=20), d_model=10)
    dense = FeedForward(10, 20)
    with torch.no_grad():
        dense.w1.weight.copy_(moe.experts.w1[0])
        dense.w3.weight.copy_(moe.experts.w3[0])
        dense.w2.weight.copy_(moe.experts.w2[0])
    x = torch.randn(3, 5, 10)
    y, routing = moe(x)
    torch.testing.assert_close(y, dense(x), atol=1e-6, rtol=1e-6)
    assert torch.all(routing.weights_TK == 1.0)


def test_routing_information_is_consistent():
    moe = MoE(MoEConfig(n_routed_experts=8, top_k=3, expert_ffn_dim=8), d_model=16)
    _, r = moe(torch.randn(4, 9, 16))
    assert r.logits_TE.dtype == torch.float32 and r.logits_TE.shape == (36, 8)
    torch.testing.assert_close(r.scores_TE, r.logits_TE.softmax(-1))
    assert torch.all(r.idx_TK.sort(-1).values.diff(dim=-1) > 0)  # distinct experts per token
    torch.testing.assert_close(r.weights_TK.sum(-1), torch.ones(36))
    assert torch.equal(r.counts_E, torch.bincount(r.idx_TK.flatten(), minlength=8))
