"""Hunyuan-Large (``hunyuan``, Tencent remote code, not in transformers): Hunyuan's MoE layer (routed
experts, top-``moe_topk``, beside ``num_shared_expert`` always-on experts) with cross-layer
attention (CLA): with ``use_cla``, only every ``cla_share_factor``-th layer has its own k and v
projections, the others reuse them (so they also cache nothing new).

Sources: Tencent-Hunyuan-Large's ``modeling_hunyuan.py`` and the Hunyuan-Large report (Sun et
al. 2024, Table 1: 389B total, 52B active, 64 layers, 16 routed + 1 shared experts, top-1).
"""

from __future__ import annotations

import dataclasses

from moekit.accounting import AttentionShape, Component, Counted, count_extended
from moekit.interop.types._base import ModelType
from moekit.interop.types._reader import Reader, common, constant, make


def account(r: Reader) -> Counted:
    base = common(r)
    bias = r.bool("attention_bias", False)
    base["attention"].update(qkv_bias=bias, o_bias=bias, qk_norm="head" if r.bool("use_qk_norm", False) else "none")
    f = r.int("intermediate_size")
    n_shared = r.int("num_shared_expert", 1)
    moe = dict(
        n_routed_experts=constant(r, "num_experts", 1),
        top_k=constant(r, "moe_topk", 1, "num_experts_per_tok"),
        expert_ffn_dim=r.int("moe_intermediate_size", f),
        n_shared_experts=n_shared,
        shared_ffn_dim=f,
    )
    cfg = make(r, base, dense_ffn_dim=f, moe=moe, moe_ids=list(range(base["n_layers"])))
    n = cfg.n_layers
    a = cfg.attention
    share = r.int("cla_share_factor", 1) if r.bool("use_cla", False) else 1
    n_kv = len(range(0, n, share))  # layers with their own k and v
    own = {c.name: c for c in count_extended(cfg).params.components}["attention"]
    kv = {"k", "v", "k bias", "v bias"}
    attention = Component(
        "attention",
        n,
        f"{n} layers",
        tuple(t for t in own.terms if t.label not in kv),
        once=tuple(dataclasses.replace(t, factors=(n_kv, *t.factors)) for t in own.terms if t.label in kv),
    )
    note = f"cross-layer attention: {n_kv} of {n} layers have k/v projections" if share > 1 else ""
    counted = count_extended(cfg, replace={"attention": attention}, notes=(note,) if note else ())
    shapes = (AttentionShape(n, a.n_heads, a.head_dim, a.head_dim, 0, "0"),)
    if n_kv:
        shapes = (
            AttentionShape(
                n_kv, a.n_heads, a.head_dim, a.head_dim, 2 * a.n_kv_heads * a.head_dim, f"2·{a.n_kv_heads}·{a.head_dim}"
            ),
            AttentionShape(n - n_kv, a.n_heads, a.head_dim, a.head_dim, 0, "0"),
        )
    return Counted(counted.name, counted.params, shapes, cfg.max_seq_len)


HUNYUAN = ModelType("hunyuan", account=account)
