"""MiniMax-Text-01 (``minimax``): a hybrid of lightning (linear) attention and softmax attention
layers, every layer a top-k MoE. Layer kinds come from ``layer_types``, else the published
config's ``attn_type_list`` (1 softmax, 0 lightning), else transformers' default (even layers
softmax). A lightning layer holds ``qkv_proj`` (d → 3·H·hd), ``output_gate`` (d → H·hd),
``out_proj`` (H·hd → d) and an RMSNorm over H·hd; its decay rates are buffers. Source:
transformers' ``modeling_minimax.py``."""

from __future__ import annotations

from moekit.accounting import Component, Counted, Term, count_extended
from moekit.accounting.params import attention_shape
from moekit.config import ConfigError
from moekit.interop.types._base import ModelType
from moekit.interop.types._reader import MISSING, Reader, common, make


def account(r: Reader) -> Counted:
    base = common(r)
    if base["attention"]["head_dim"] is None:
        base["attention"]["head_dim"] = base["d_model"] // base["attention"]["n_heads"]
    n = base["n_layers"]
    types = r.get("layer_types", None)
    if types is None and r.get("attn_type_list", None) is not None:
        types = ["full_attention" if t == 1 else "linear_attention" for t in r.int_list("attn_type_list")]
    if types is None:
        types = ["full_attention" if (i + 1) % 2 else "linear_attention" for i in range(n)]
    if len(types) != n:
        raise ConfigError(f"{r.where}: 'layer_types' must give one type per layer ({n}), got {len(types)}")
    moe = dict(
        n_routed_experts=r.int("num_local_experts", MISSING, "num_experts"),
        top_k=r.int("num_experts_per_tok"),
        expert_ffn_dim=r.int("intermediate_size"),
    )
    cfg = make(r, base, dense_ffn_dim=r.int("intermediate_size"), moe=moe, moe_ids=list(range(n)))
    d, a = cfg.d_model, cfg.attention
    inner = a.n_heads * a.head_dim
    n_full = types.count("full_attention")
    n_lin = n - n_full
    own = {c.name: c for c in count_extended(cfg).params.components}
    linear = Component(
        "linear_attention",
        n_lin,
        f"{n_lin} lightning-attention layers",
        (Term("qkv_proj", (d, 3, inner)), Term("output_gate", (d, inner)), Term("out_proj", (inner, d))),
    )
    norms = Component(
        "norms",
        n,
        f"{n} layers",
        (Term("attn_norm+ffn_norm", (2, d), matmul=False),),
        once=(Term("final", (d,), matmul=False), Term("lightning norm", (n_lin, inner), matmul=False)),
    )
    attention = Component("attention", n_full, f"{n_full} softmax-attention layers", own["attention"].terms)
    counted = count_extended(
        cfg,
        [linear],
        replace={"attention": attention, "norms": norms},
        notes=(f"hybrid: {n_full} softmax + {n_lin} lightning-attention layers (fixed-size state, no KV cache)",),
    )
    return Counted(counted.name, counted.params, (attention_shape(a, n_full),), cfg.max_seq_len)


MINIMAX = ModelType("minimax", account=account)
