"""Jamba (``jamba``, AI21): a hybrid of Mamba and attention layers (one attention layer per
``attn_layer_period``, at ``attn_layer_offset``) with an MoE FFN every ``expert_layer_period``
layers (at ``expert_layer_offset``), dense SwiGLU FFNs elsewhere.

Counted natively. A Mamba (v1) mixer of inner width ``di = mamba_expand · d`` holds ``in_proj``
(d → 2·di), a depthwise conv (di × d_conv, + bias), ``x_proj`` (di → dt_rank + 2·d_state),
``dt_proj`` (dt_rank → di, + bias), ``A_log`` (di × d_state), ``D`` (di), ``out_proj`` (di → d) and
RMSNorms over dt, B and C. Source: transformers' ``modeling_jamba.py``.
"""

from __future__ import annotations

import math

from moekit.accounting import Component, Counted, Term, count_extended
from moekit.accounting.params import attention_shape
from moekit.interop.types._base import ModelType
from moekit.interop.types._reader import MISSING, Reader, common, make


def mamba_terms(r: Reader, d: int, *, inner_norms: bool) -> tuple[list[Term], int]:
    """One Mamba (v1) mixer's terms and its inner norms' width."""
    di = r.int("mamba_expand", 2) * d
    n = r.int("mamba_d_state", 16)
    k = r.int("mamba_d_conv", 4)
    rank = r.get("mamba_dt_rank", "auto")
    rank = math.ceil(d / 16) if rank == "auto" else r.int("mamba_dt_rank")
    proj_bias = r.bool("mamba_proj_bias", False)
    terms = [
        Term("in_proj", (d, 2, di)),
        Term("conv1d", (di, k)),
        Term("x_proj", (di, rank + 2 * n)),
        Term("dt_proj", (rank, di)),
        Term("dt_proj bias,D", (2, di), matmul=False),
        Term("A_log", (di, n), matmul=False),
        Term("out_proj", (di, d)),
    ]
    if r.bool("mamba_conv_bias", True):
        terms.append(Term("conv1d bias", (di,), matmul=False))
    if proj_bias:
        terms.append(Term("in_proj,out_proj bias", (2 * di + d,), matmul=False))
    return terms, (rank + 2 * n if inner_norms else 0)


def account(r: Reader) -> Counted:
    base = common(r)
    n = base["n_layers"]
    attn = [i for i in range(n) if i % r.int("attn_layer_period", 8) == r.int("attn_layer_offset", 4)]
    experts = [i for i in range(n) if i % r.int("expert_layer_period", 2) == r.int("expert_layer_offset", 1)]
    moe = dict(
        n_routed_experts=r.int("num_experts", MISSING, "num_local_experts"),
        top_k=r.int("num_experts_per_tok"),
        expert_ffn_dim=r.int("intermediate_size"),
    )
    if moe["n_routed_experts"] <= 1:
        experts = []
    cfg = make(r, base, dense_ffn_dim=r.int("intermediate_size"), moe=moe if experts else None, moe_ids=experts)
    d = cfg.d_model
    terms, inner = mamba_terms(r, d, inner_norms=True)
    n_mamba = n - len(attn)
    own = {c.name: c for c in count_extended(cfg).params.components}
    attention = own["attention"]
    counted = count_extended(
        cfg,
        [Component("mamba", n_mamba, f"{n_mamba} Mamba layers", tuple(terms))],
        replace={
            "attention": Component("attention", len(attn), f"{len(attn)} attention layers", attention.terms),
            "norms": Component(
                "norms",
                n,
                f"{n} layers",
                (Term("attn_norm+ffn_norm", (2, d), matmul=False),),
                once=(Term("final", (d,), matmul=False), Term("mamba dt,B,C norms", (n_mamba, inner), matmul=False)),
            ),
        },
        notes=(f"hybrid: {len(attn)} attention + {n_mamba} Mamba layers (fixed-size state, no KV cache)",),
    )
    return Counted(counted.name, counted.params, (attention_shape(cfg.attention, len(attn)),), cfg.max_seq_len)


JAMBA = ModelType("jamba", account=account)
