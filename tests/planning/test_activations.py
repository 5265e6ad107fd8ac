"""The activation estimate: a hand-worked example, and the measured peak memory of CPU training steps.

Measuring: one warm-up forward + backward allocates every ``.grad``; the measured step then runs
under ``torch.profiler.profile(profile_memory=True)``, which records every CPU allocation and free
(its ``[memory]`` events carry signed byte counts). Summed in time order they give the bytes
allocated above the state before the step (weights and gradients), and their maximum is the peak
of the forward + backward: the figure the estimate predicts. Everything runs in the calling thread
(``expert_threads(1)``) so no allocation escapes the profiler.
"""

from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from moekit.config import AttentionConfig, ModelConfig, MoEConfig
from moekit.layers.experts import expert_threads
from moekit.models.transformer import MoETransformer
from moekit.planning import Layout, estimate_activations, training_activation_bytes


def measured_peak(cfg: ModelConfig, batch: int, seq_len: int, impl: str, dtype: torch.dtype = torch.float32) -> int:
    """Peak bytes allocated during one forward + backward above the state before it (see above)."""
    model = MoETransformer(cfg).to(dtype)
    model.set_moe_impl(impl)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq_len))

    def step() -> None:
        output = model(ids, labels=ids)  # held through backward, logits included, as the training loop does
        output.loss.backward()

    with expert_threads(1):
        step()
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            step()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    running = peak = 0
    for _, nbytes in events:
        running += nbytes
        peak = max(peak, running)
    return peak


SMALL = ModelConfig(
    vocab_size=512,
    d_model=64,
    n_layers=2,
    attention=AttentionConfig(n_heads=4, n_kv_heads=2),
    dense_ffn_dim=128,
    moe=MoEConfig(n_routed_experts=8, top_k=2, expert_ffn_dim=32, n_shared_experts=1, first_k_dense=1),
)
LARGER = ModelConfig(
    vocab_size=2048,
    d_model=128,
    n_layers=4,
    attention=AttentionConfig(n_heads=8, n_kv_heads=2, qk_norm="head"),
    dense_ffn_dim=256,
    moe=MoEConfig(n_routed_experts=32, top_k=4, expert_ffn_dim=64, n_shared_experts=1, first_k_dense=1),
)
MLA = ModelConfig(
    vocab_size=256,
    d_model=64,
    n_layers=2,
    attention=AttentionConfig(
        n_heads=4, kind="mla", q_lora_rank=48, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16
    ),
    dense_ffn_dim=128,
    moe=MoEConfig(n_routed_experts=8, top_k=2, expert_ffn_dim=32, n_shared_experts=1, first_k_dense=1),
)


SINKS = SMALL.replace(attention=AttentionConfig(n_heads=4, n_kv_heads=2, sinks=True))
BF16 = torch.bfloat16


@pytest.mark.parametrize(
    "cfg, batch, seq_len, impl, kernel, dtype",
    [
        (SMALL, 2, 128, "fused", "flash", torch.float32),
        (SMALL, 2, 128, "grouped_mm", "flash", torch.float32),
        (LARGER, 2, 256, "fused", "flash", torch.float32),
        (LARGER, 2, 256, "grouped_mm", "flash", torch.float32),
        (LARGER, 2, 256, "grouped_mm", "flash", BF16),
        # CPU has no flash kernel for MLA's d_qk != d_v: the math kernel keeps the probabilities.
        (MLA, 2, 128, "fused", "math", torch.float32),
        (MLA, 2, 128, "fused", "math", BF16),
        (SINKS, 2, 128, "fused", "flash", torch.float32),
    ],
    ids=["small-fused", "small-rows", "larger-fused", "larger-rows", "larger-rows-bf16", "mla", "mla-bf16", "sinks"],
)
def test_estimate_within_25_percent_of_measured_peak(cfg, batch, seq_len, impl, kernel, dtype):
    est = training_activation_bytes(
        cfg,
        batch,
        seq_len,
        "bf16" if dtype == BF16 else "fp32",
        experts_impl="fused" if impl == "fused" else "rows",
        attention_kernel=kernel,
    )
    peak = measured_peak(cfg, batch, seq_len, impl, dtype)
    assert abs(est - peak) <= 0.25 * peak, f"estimate {est:,} vs measured {peak:,} ({est / peak:.3f})"


def test_hand_worked_example():
    """D 8, H 2, G 1, hd 4, 2 layers (one dense of width 16, one MoE: E 4, K 2, F 6, one shared
    expert of width 6), V 32, fp32 (b = 4), 10 tokens."""
    cfg = ModelConfig(
        vocab_size=32,
        d_model=8,
        n_layers=2,
        attention=AttentionConfig(n_heads=2, n_kv_heads=1, head_dim=4),
        dense_ffn_dim=16,
        moe=MoEConfig(n_routed_experts=4, top_k=2, expert_ffn_dim=6, n_shared_experts=1, first_k_dense=1),
    )
    est = estimate_activations(cfg, "fp32", 10, experts_impl="fused")
    norms = 2 * (3 * 8 + 1) * 4  # 200 per layer
    attention = (2 * 2 * 4 + 2 * 1 * 4) * 4 + 4 * 2  # 104 per layer
    dense = 4 * 16 * 4  # 256
    router = 4 * 4 + 16 * 2 + 4  # 52 (fp32 model: the router reads its input without a copy)
    routed = 2 * (2 * 6 * 4 + 4 + 16)  # 136
    shared = 4 * 6 * 4  # 96
    head = (3 * 8 + 1) * 4 + 32 * 4  # 228
    assert est.saved_per_token == {
        "norms": 2 * norms,
        "attention": 2 * attention,
        "dense_ffn": dense,
        "moe": router + routed + shared,
        "head": head,
    }
    assert est.loss_backward_per_token == 3 * 4 * 32
    assert est.expert_grad == 3 * 4 * 6 * 8 * 4  # w1, w3, w2 of 4 experts
    saved = 10 * (2 * norms + 2 * attention + dense + router + routed + shared + head)
    assert est.peak(10) == saved + max(10 * 384, 2304)
    # Under ep = 2, etp = 3 the rows path applies: 2 experts of width 2, and 3D + 4F per row.
    ep = estimate_activations(cfg, "bf16", 10, Layout(2, 2, 3))
    assert ep.saved_per_token["moe"] == (4 * 4 + 16 * 2 + 4 + 4 * 8) + 2 * ((3 * 8 + 4 * 2) * 2 + 2 + 8) + 4 * 6 * 2
    assert ep.expert_grad == 2 * 2 * 8 * 2


def test_sinks_charge_the_probabilities():
    flash = estimate_activations(SMALL, "bf16", 512).saved_per_token["attention"]
    sinks = estimate_activations(SINKS, "bf16", 512).saved_per_token["attention"]
    # per layer (H 4, G 2, hd 16, S 512, b 2): flash keeps q, k, v, output and fp32 log-sum-exp;
    # the sinks softmax keeps q and k, v repeated to 4 heads, the [S + 1] probabilities, the output.
    assert flash == 2 * (((4 + 2 * 2) * 16 + 4 * 16) * 2 + 4 * 4)
    assert sinks == 2 * (3 * 4 * 16 + 4 * 513 + 4 * 16) * 2
