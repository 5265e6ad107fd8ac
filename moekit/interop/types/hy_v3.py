"""Hy3 (``hy_v3``, Tencent): GQA with per-head q/k norms, MLPs by ``mlp_layer_types`` ("dense" /
"sparse"; by default the first layer dense), sparse layers DeepSeek-V3-style (a selection bias
buffer, shared experts ``num_shared_experts`` × ``moe_intermediate_size`` wide). Source:
transformers' ``modeling_hy_v3.py``."""

from __future__ import annotations

from moekit.config import ConfigError, ModelConfig
from moekit.interop.types._base import ModelType
from moekit.interop.types._reader import MISSING, Reader, common, make


def read(r: Reader) -> ModelConfig:
    base = common(r)
    if base["attention"]["head_dim"] is None:
        base["attention"]["head_dim"] = base["d_model"] // base["attention"]["n_heads"]
    bias = r.bool("attention_bias", False)
    base["attention"].update(qkv_bias=bias, o_bias=bias, qk_norm="head")
    n = base["n_layers"]
    types = r.get("mlp_layer_types", None)
    if types is None:
        types = ["dense"] * min(n, 1) + ["sparse"] * max(n - 1, 0)
    if not isinstance(types, list) or len(types) != n:
        raise ConfigError(f"{r.where}: 'mlp_layer_types' must list 'dense' or 'sparse' for each of the {n} layers")
    n_shared = r.int("num_shared_experts", 0)
    f = r.int("moe_intermediate_size")
    moe = dict(
        n_routed_experts=r.int("num_experts", MISSING, "num_local_experts"),
        top_k=r.int("num_experts_per_tok"),
        expert_ffn_dim=f,
        n_shared_experts=1 if n_shared else 0,
        shared_ffn_dim=n_shared * f if n_shared else None,
        score_func="sigmoid",
        norm_topk_prob=True,
        selection_bias=True,
    )
    ids = [i for i, t in enumerate(types) if t == "sparse"]
    return make(r, base, dense_ffn_dim=r.int("intermediate_size"), moe=moe if ids else None, moe_ids=ids)


HY_V3 = ModelType("hy_v3", read=read)
