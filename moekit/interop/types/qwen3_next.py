"""Qwen3-Next (``qwen3_next``, Alibaba): a hybrid of gated delta-net linear attention and gated full
attention (one full-attention layer in ``full_attention_interval``, by ``layer_types``), every
layer a Qwen2-MoE block (routed experts + a sigmoid-gated shared expert).

Counted natively (moekit cannot build the linear attention): the full-attention layers' q
projection is twice as wide (query and output gate), each linear-attention layer holds
``in_proj_qkvz`` (d → 2·k_dim + 2·v_dim), ``in_proj_ba`` (d → 2·n_v_heads), a depthwise conv over
2·k_dim + v_dim channels, ``dt_bias`` and ``A_log`` (n_v_heads each), a gated RMSNorm over the
value head and ``out_proj`` (v_dim → d). Source: transformers' ``modeling_qwen3_next.py``.
"""

from __future__ import annotations

from moekit.accounting import Component, Counted, Term, count_extended
from moekit.accounting.params import attention_shape
from moekit.config import AttentionConfig, ConfigError, ModelConfig
from moekit.interop.types._base import ModelType
from moekit.interop.types._reader import Reader, common, make
from moekit.interop.types.qwen2_moe import qwen_moe_ids


def layer_types(r: Reader, n_layers: int, linear: str = "linear_attention") -> list[str]:
    """``layer_types``, or every ``full_attention_interval``-th layer full (transformers' default)."""
    types = r.get("layer_types", None)
    if types is None:
        every = r.int("full_attention_interval", 4)
        types = [linear if (i + 1) % every else "full_attention" for i in range(n_layers)]
    if not isinstance(types, list) or len(types) != n_layers:
        raise ConfigError(f"{r.where}: 'layer_types' must list one type per layer ({n_layers}), got {types!r}")
    return types


def moe_block(r: Reader) -> dict:
    return dict(
        n_routed_experts=r.int("num_experts"),
        top_k=r.int("num_experts_per_tok"),
        expert_ffn_dim=r.int("moe_intermediate_size"),
        n_shared_experts=1,
        shared_ffn_dim=r.int("shared_expert_intermediate_size"),
        shared_expert_gate=True,
        norm_topk_prob=r.bool("norm_topk_prob", True),
    )


def gated_attention(a: AttentionConfig, d: int, n: int, bias: bool) -> Component:
    """``n`` full-attention layers whose q projection also yields a per-channel output gate."""
    h, g, hd = a.n_heads, a.n_kv_heads, a.head_dim
    terms = [Term("q+gate", (d, 2, h, hd)), Term("k", (d, g, hd)), Term("v", (d, g, hd)), Term("o", (h, hd, d))]
    if bias:
        terms += [Term("q+gate,k,v,o bias", (2 * h * hd + 2 * g * hd + d,), matmul=False)]
    return Component("attention", n, f"{n} full-attention layers", tuple(terms))


def account(r: Reader) -> Counted:
    base = common(r)
    bias = r.bool("attention_bias", False)
    base["attention"].update(qkv_bias=bias, o_bias=bias, qk_norm="head")
    ids = qwen_moe_ids(r, base["n_layers"], r.int("num_experts"))
    cfg: ModelConfig = make(r, base, dense_ffn_dim=r.int("intermediate_size"), moe=moe_block(r), moe_ids=ids)
    d, n = cfg.d_model, cfg.n_layers
    types = layer_types(r, n)
    n_full = types.count("full_attention")
    n_lin = n - n_full
    nk, nv = r.int("linear_num_key_heads"), r.int("linear_num_value_heads")
    dk, dv = r.int("linear_key_head_dim"), r.int("linear_value_head_dim")
    kd, vd = nk * dk, nv * dv
    linear = Component(
        "linear_attention",
        n_lin,
        f"{n_lin} gated delta-net layers",
        (
            Term("in_proj_qkvz", (d, 2 * kd + 2 * vd)),
            Term("in_proj_ba", (d, 2 * nv)),
            Term("conv1d", (2 * kd + vd, r.int("linear_conv_kernel_dim", 4))),
            Term("dt_bias,A_log", (2, nv), matmul=False),
            Term("out_proj", (vd, d)),
        ),
    )
    hd = cfg.attention.head_dim
    norms = Component(
        "norms",
        n,
        f"{n} layers",
        (Term("attn_norm+ffn_norm", (2, d), matmul=False),),
        once=(
            Term("final", (d,), matmul=False),
            Term("q_norm,k_norm", (n_full, 2, hd), matmul=False),
            Term("gated_norm", (n_lin, dv), matmul=False),
        ),
    )
    counted = count_extended(
        cfg,
        [linear],
        replace={"attention": gated_attention(cfg.attention, d, n_full, bias), "norms": norms},
        notes=(f"hybrid: {n_full} full-attention + {n_lin} linear-attention layers (fixed-size state, no KV cache)",),
    )
    shape = attention_shape(cfg.attention, n_full)
    return Counted(counted.name, counted.params, (shape,), cfg.max_seq_len)


QWEN3_NEXT = ModelType("qwen3_next", account=account)
