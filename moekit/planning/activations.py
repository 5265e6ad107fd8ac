"""Activation memory of a training step: what autograd holds when backward starts, per token.

The formula counts the tensors moekit's modules save for backward (read from their code and
checked with ``torch.autograd.graph.saved_tensors_hooks``), at b = bytes(dtype), f32 = 4, i64 = 8;
D width, H query heads, G kv heads, hd head width, K experts per token, E routed experts, F expert
width (F / etp under expert tensor parallelism), S sequence length, V vocabulary:

    norm(n)                    (2n + 1)·4 + n·b   nn.RMSNorm computes in fp32: it keeps fp32 x,
                                                x·rstd and rstd; the next matmul keeps the
                                                normed output (LayerNorm: 2n·b + 8)
    per layer  norms           2·norm(D)        before attention and before the FFN
               GQA attention   (2·H·hd + 2·G·hd)·b + 4·H    q, k, v, output, fp32 log-sum-exp
                                                (flash kernels, CUDA and CPU); + (2·(H+G)·hd +
                                                H+G)·4 with a q/k norm, + (H+G)·hd·4 with L2
               MLA attention   norm(q_lora) + norm(C) + (2·H·d_qk + 2·H·d_v)·b + 4·H
                                                the two latent norms, then as above
               math kernel     (q, k, v widths + H·S)·4 + H·d_v·b  instead of the flash terms:
                                                fp32 q, k, v and probabilities, the output
                                                (CPU MLA: no flash kernel for d_qk ≠ d_v)
               sinks           (3·H·hd + H·(S + 1) + H·hd)·b   moekit's softmax with sinks: q and
                                                k, v repeated to H heads, the probabilities
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
    head                       norm(D) + V·b    final norm, lm_head input, the logits

Peak = tokens × (Σ layers + head) + max(tokens × 12·V, expert gradients), tokens = micro_batch ×
seq_len: every saved tensor is alive when backward starts; on top of them, the larger of two
transients: the loss's three fp32 [tokens, V] buffers at the start of backward (log-probs, their
gradient, the logits' gradient), or one MoE layer's expert weight gradients, which exist apart
from the ``.grad`` buffers until autograd adds them in (3·(E/ep)·(F/etp)·D·b for the fused
backward, which returns w1, w3 and w2 together; a third of it for grouped_mm, one at a time).
Shapes small next to these (embedding ids, rotary tables, per-expert counts) are left out; no
recomputation.

``tests/planning/test_activations.py`` checks the estimate against the measured peak memory of
small CPU training steps in fp32 and bf16 (torch.profiler's allocation events, summed in time
order): within 1% for GQA and MLA models, fused and grouped_mm experts. What CUDA kernels keep
was not measured here; flash attention and grouped_mm keep the same tensors by their autograd
formulas, but a fused CUDA RMSNorm would keep less than ``norm(n)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from moekit.accounting import DTYPE_BYTES
from moekit.config import ModelConfig
from moekit.parallel.layout import Layout

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

    def rms(n: int) -> int:  # nn.RMSNorm keeps fp32 x, x·rstd and rstd; the next matmul its output
        return (2 * n + 1) * F32 + n * b

    layer_norm = rms(d) if cfg.norm == "rmsnorm" else 2 * d * b + 2 * F32  # LayerNorm: x, mean, rstd
    norms = 2 * layer_norm
    if a.kind == "mla":
        c, ql = a.kv_lora_rank, a.q_lora_rank
        latents = (rms(ql) if ql else 0) + rms(c)
        dqk, dv = a.qk_nope_head_dim + a.qk_rope_head_dim, a.v_head_dim
        q_k_v = 2 * h * dqk + h * dv  # per token, all heads
        out = h * dv
    else:
        g, hd = a.n_kv_heads, a.head_dim
        latents = 0
        if a.qk_norm in ("head", "full"):
            latents = 2 * (h + g) * hd * F32 + (h + g) * F32
        elif a.qk_norm == "l2":
            latents = (h + g) * hd * F32
        q_k_v = (h + 2 * g) * hd
        dqk, out = hd, h * hd
    if a.sinks:  # moekit's own softmax with sinks: q, k and v repeated to H heads, probabilities
        attention = latents + (3 * h * dqk + h * (seq_len + 1) + out) * b
    elif attention_kernel == "math":
        # NOTE: torch's math kernel (on CPU for d_qk != d_v) keeps fp32 copies of q, k and v and
        # fp32 probabilities when the model runs in half precision.
        attention = latents + (q_k_v + h * seq_len) * F32 + out * b
    else:
        attention = latents + (q_k_v + out) * b + h * F32  # flash: q, k, v, output, log-sum-exp
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
        "head": layer_norm + cfg.vocab_size * b,  # final norm, lm_head input, logits
    }
    return ActivationEstimate(
        saved_per_token=saved,
        loss_backward_per_token=3 * F32 * cfg.vocab_size,
        expert_grad=expert_grad,
        layer_max_per_token=norms + attention + max(dense_ffn if n_dense else 0, moe_layer),
    )


def inference_bytes_per_token(
    cfg: ModelConfig,
    dtype: str,
    seq_len: int,
    layout: Layout | None = None,
    *,
    experts_impl: ExpertsImpl = "rows",
    attention_kernel: AttentionKernel = "flash",
) -> float:
    """Peak working set per token of a forward without autograd (a prefill): the residual stream
    and its normed copy, plus the largest of one attention, one FFN / MoE, or the logits (moekit's
    forward computes them at every position). Nothing is kept from layer to layer. A coarse figure
    (0.6-0.9 of the measured peak of CPU bf16 forwards, whose matmuls add temporaries), small next
    to the weights and the KV cache it sits beside."""
    layout = layout or Layout(1)
    b, d, a, h = DTYPE_BYTES[dtype], cfg.d_model, cfg.attention, cfg.attention.n_heads
    if a.kind == "mla":
        ql, c, r = a.q_lora_rank or 0, a.kv_lora_rank, a.qk_rope_head_dim
        dqk, dv = a.qk_nope_head_dim + r, a.v_head_dim
        # latents, the expanded k_nope|v, then q, k, v and the output
        attention = (ql + c + r + h * (a.qk_nope_head_dim + dv) + 2 * h * dqk + 2 * h * dv) * b
    else:
        attention = (2 * a.n_heads + 2 * a.n_kv_heads) * a.head_dim * b
        dqk = dv = a.head_dim
    if attention_kernel == "math" or a.sinks:
        attention += (2 * h * seq_len + h * (2 * dqk + dv)) * F32  # scores, probabilities, fp32 q, k, v
    ffn = 3 * cfg.dense_ffn_dim * b if cfg.n_dense_layers else 0
    if cfg.moe is not None and cfg.moe_layer_ids:
        m = cfg.moe
        k, f = m.top_k, m.expert_ffn_dim // layout.etp
        router = 2 * F32 * m.n_routed_experts + (F32 * d if b != F32 else 0)
        fused = experts_impl == "fused" and layout.ep == 1
        routed = d * b if fused else k * (2 * d + 2 * f) * b  # output only, or rows in and out
        ffn = max(ffn, router + routed + 3 * m.n_shared_experts * m.shared_ffn_dim * b)
    return 2 * d * b + max(attention, ffn, cfg.vocab_size * b)


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
