"""ERNIE 4.5 MoE (``ernie4_5_moe``, Baidu): layer i is MoE iff (i + 1) % moe_layer_interval == 0 and
moe_layer_start_index ≤ i ≤ moe_layer_end_index; shared experts ``moe_num_shared_experts`` ×
``moe_intermediate_size`` wide; ``use_bias`` puts biases on attention, dense and shared MLPs (not
on routed experts). Its router's ``e_score_correction_bias`` is a parameter (frozen) here, so
it is counted under ``routers``. Source: transformers' ``modeling_ernie4_5_moe.py``."""

from __future__ import annotations

import dataclasses

from moekit.accounting import Counted, Term, count_extended
from moekit.config import ModelConfig
from moekit.interop.types._base import ModelType
from moekit.interop.types._reader import MISSING, Reader, common, make


def account(r: Reader) -> Counted:
    base = common(r)
    bias = r.bool("use_bias", False)
    base["attention"].update(qkv_bias=bias, o_bias=bias)
    n = base["n_layers"]
    e = r.int("moe_num_experts", MISSING, "num_experts")
    f = r.int("moe_intermediate_size")
    n_shared = r.int("moe_num_shared_experts", 0)
    every, start, end = (
        r.int("moe_layer_interval", 1),
        r.int("moe_layer_start_index", 0),
        r.int("moe_layer_end_index", n - 1),
    )
    ids = [i for i in range(n) if (i + 1) % every == 0 and start <= i <= end]
    moe = dict(
        n_routed_experts=e,
        top_k=r.int("moe_k", MISSING, "num_experts_per_tok"),
        expert_ffn_dim=f,
        n_shared_experts=1 if n_shared else 0,
        shared_ffn_dim=n_shared * f if n_shared else None,
    )
    cfg: ModelConfig = make(r, base, dense_ffn_dim=r.int("intermediate_size"), moe=moe if ids else None, moe_ids=ids)
    own = {c.name: c for c in count_extended(cfg).params.components}
    replace = {}
    if ids:
        selection = Term("e_score_correction_bias", (e,), matmul=False)
        replace["routers"] = dataclasses.replace(own["routers"], terms=(*own["routers"].terms, selection))
    if bias:
        d = cfg.d_model
        for name, width in (("dense_ffn", cfg.dense_ffn_dim), ("shared_experts", n_shared * f)):
            c = own[name]
            if c.terms:
                b = Term("b1,b3,b2", (2 * width + d,), matmul=False)
                replace[name] = dataclasses.replace(c, terms=(*c.terms, b))
    return count_extended(cfg, replace=replace)


ERNIE4_5_MOE = ModelType("ernie4_5_moe", account=account)
