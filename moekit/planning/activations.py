"""Activation memory of a training step: what autograd holds when backward starts, per token.

The formula counts the tensors moekit's modules save for backward (read from their code and
checked with ``torch.autograd.graph.saved_tensors_hooks``), at b = bytes(dtype), f32 = 4, i64 = 8;
D width, H query heads, G kv heads, hd head width, K experts per token, E routed experts, F expert
width (F / etp under expert tensor parallelism), S sequence length, V vocabulary:

    per layer  norms           2·(3D + 1)·b     RMSNorm saves x, x·rstd and rstd; the next matmul
                                                saves the normed output
               GQA attention   (2·H·hd + 2·G·hd)·b + 4·H    q, k, v, output, fp32 log-sum-exp
                                                (flash kernels, CUDA and CPU); + 2·(H+G)·hd·b with
                                                a q/k norm, + (H+G)·hd·b with an L2 q/k norm
               MLA attention   (3·q_lora + 1 + C + R + 2C + 1)·b + (2·H·d_qk + 2·H·d_v)·b + 4·H
                                                the latents and their norms, then as above
               math kernel     + H·S·b          the probabilities (attention sinks, or CPU MLA
                                                whose d_qk ≠ d_v has no flash kernel)
               dense FFN       4·F_dense·b      w1·x, silu, w3·x, their product
               MoE router      4·E + 16·K + 4   fp32 scores, top-k indices, gathered and
                                                normalised weights (+ 4·D: the fp32 copy of
                                                the router input when b ≠ 4)
               routed, fused   K·(2F·b + b + 16)  h1, h3, gate and row indices per row
                                                (moekit's CPU path; ep = 1 only)
               routed, rows    K·((3D + 4F)·b + b + 8)   per row: the dispatched input, h1, h3,
                                                silu, their product, the expert output and its
                                                gate-weighted copy (grouped_mm on CUDA, and
                                                every layout with ep > 1: EP delivers rows)
               shared experts  4·n_shared·F_shared·b (+ (D + 1)·b with a shared gate)
    head                       (3D + 1)·b + V·b   final norm, lm_head input, the logits

Peak = tokens × (Σ layers + head) + max(tokens × 12·V, expert gradients), tokens = micro_batch ×
seq_len: every saved tensor is alive when backward starts; on top of them, the larger of two
transients: the loss's three fp32 [tokens, V] buffers at the start of backward (log-probs, their
gradient, the logits' gradient), or one MoE layer's expert weight gradients, which exist apart
from the ``.grad`` buffers until autograd adds them in (3·(E/ep)·(F/etp)·D·b for the fused
backward, which returns w1, w3 and w2 together; a third of it for grouped_mm, one at a time).
Shapes small next to these (embedding ids, rotary tables, per-expert counts) are left out; no
recomputation.

``tests/planning/test_activations.py`` checks the estimate against the measured peak memory of
small CPU training steps (torch.profiler's allocation events, summed in time order).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from moekit.accounting import DTYPE_BYTES
from moekit.config import ModelConfig
from moekit.planning.layout import Layout

ExpertsImpl = Literal["rows", "fused"]
AttentionKernel = Literal["flash", "math"]
F32, I64 = 4, 8


@dataclass(frozen=True)
class ActivationEstimate:
    """The parts of a training step's activation memory (bytes), from ``estimate_activations``."""

    saved_per_token: dict[str, float]  # what autograd saves per token, by part, over all layers
    loss_backward_per_token: float  # fp32 log-probs and two [tokens, V] gradients
    expert_grad: float  # one MoE layer's expert weight gradients, before they join .grad
    layer_max_per_token: float  # the largest single layer (inference working set, recomputation)

    def peak(self, tokens: int) -> int:
        """Peak bytes above weights, gradients and optimiser state for ``tokens`` tokens per rank."""
        saved = tokens * sum(self.saved_per_token.values())
        return math.ceil(saved + max(tokens * self.loss_backward_per_token, self.expert_grad))


def estimate_activations(
    cfg: ModelConfig,
    dtype: str,
    seq_len: int,
    layout: Layout | None = None,
    *,
    experts_impl: ExpertsImpl = "rows",
    attention_kernel: AttentionKernel = "flash",
) -> ActivationEstimate:
    """The module docstring's formula for ``cfg`` at ``dtype`` and ``seq_len`` under ``layout``.

    ``experts_impl="fused"`` is moekit's CPU path; it only applies at ep = 1 (EP delivers rows).
    """
    layout = layout or Layout(1)
    b, d, a = DTYPE_BYTES[dtype], cfg.d_model, cfg.attention
    h = a.n_heads
    norms = 2 * (3 * d + 1 if cfg.norm == "rmsnorm" else 2 * d + 2) * b
    if a.kind == "mla":
        c, r, ql = a.kv_lora_rank, a.qk_rope_head_dim, a.q_lora_rank
        latents = (3 * ql + 1 if ql else 0) + (c + r) + 2 * c + 1
        dqk, dv = a.qk_nope_head_dim + a.qk_rope_head_dim, a.v_head_dim
        attention = (latents + 2 * h * dqk + 2 * h * dv) * b + F32 * h
    else:
        g, hd = a.n_kv_heads, a.head_dim
        attention = (2 * h * hd + 2 * g * hd) * b + F32 * h
        if a.qk_norm in ("head", "full"):
            attention += 2 * (h + g) * hd * b
        elif a.qk_norm == "l2":
            attention += (h + g) * hd * b
    if attention_kernel == "math" or a.sinks:
        attention += h * seq_len * b
    dense_ffn = 4 * cfg.dense_ffn_dim * b
    moe_layer, expert_grad = 0.0, 0.0
    if cfg.moe is not None and cfg.moe_layer_ids:
        m = cfg.moe
        k, f = m.top_k, m.expert_ffn_dim // layout.etp
        router = F32 * m.n_routed_experts + (I64 + 2 * F32) * k + F32 + (F32 * d if b != F32 else 0)
        fused = experts_impl == "fused" and layout.ep == 1
        if fused:
            routed = k * (2 * f * b + b + 2 * I64)
        else:
            routed = k * ((3 * d + 4 * f) * b + b + I64)
        shared = 4 * m.n_shared_experts * m.shared_ffn_dim * b + ((d + 1) * b if m.shared_expert_gate else 0)
        moe_layer = router + routed + shared
        # The fused backward returns w1, w3 and w2's gradients together; grouped_mm one at a time.
        expert_grad = (3 if fused else 1) * (m.n_routed_experts // layout.ep) * f * d * b
    n_moe, n_dense = len(cfg.moe_layer_ids), cfg.n_dense_layers
    saved = {
        "norms": cfg.n_layers * norms,
        "attention": cfg.n_layers * attention,
        "dense_ffn": n_dense * dense_ffn,
        "moe": n_moe * moe_layer,
        "head": (3 * d + 1) * b + cfg.vocab_size * b,
    }
    return ActivationEstimate(
        saved_per_token=saved,
        loss_backward_per_token=3 * F32 * cfg.vocab_size,
        expert_grad=expert_grad,
        layer_max_per_token=norms + attention + max(dense_ffn if n_dense else 0, moe_layer),
    )


def training_activation_bytes(cfg: ModelConfig, micro_batch: int, seq_len: int, dtype: str, **kw) -> int:
    """Estimated peak activation bytes of one forward + backward of ``micro_batch × seq_len`` tokens."""
    return estimate_activations(cfg, dtype, seq_len, **kw).peak(micro_batch * seq_len)


def recomputed_activation_bytes(cfg: ModelConfig, micro_batch: int, seq_len: int, dtype: str, **kw) -> int:
    """Full activation recomputation (not in moekit): each layer's input kept, one layer's
    activations live at a time during backward, plus the head and the loss's gradients."""
    est = estimate_activations(cfg, dtype, seq_len, **kw)
    tokens = micro_batch * seq_len
    kept = cfg.n_layers * cfg.d_model * DTYPE_BYTES[dtype] + est.layer_max_per_token + est.saved_per_token["head"]
    return math.ceil(tokens * kept + max(tokens * est.loss_backward_per_token, est.expert_grad))
