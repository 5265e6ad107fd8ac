"""Hunyuan-A13B (``hunyuan_v1_moe``, Tencent): GQA with per-head q/k norms, every layer an MoE block of
routed experts beside one always-on shared MLP, both ``intermediate_size`` wide. ``num_experts``
and ``moe_topk`` may be per-layer lists (read when they are constant). Source: transformers'
``modeling_hunyuan_v1_moe.py``."""

from __future__ import annotations

from typing import Any

from moekit.config import ConfigError, ModelConfig
from moekit.interop.types._base import ModelType
from moekit.interop.types._reader import Reader, common, make


def constant(r: Reader, key: str, default: Any = None, *aliases: str) -> int:
    """An integer key that may also be a per-layer list of one repeated value."""
    v = r.get(key, default, *aliases)
    if isinstance(v, list) and v and all(x == v[0] for x in v):
        v = v[0]
    if isinstance(v, bool) or not isinstance(v, int):
        raise ConfigError(f"{r.where}: '{key}' must be an integer (or a list of one repeated value), got {v!r}")
    return v


def read(r: Reader) -> ModelConfig:
    base = common(r)
    bias = r.bool("attention_bias", False)
    base["attention"].update(qkv_bias=bias, o_bias=bias, qk_norm="head" if r.bool("use_qk_norm", True) else "none")
    f = r.int("intermediate_size")
    moe = dict(
        n_routed_experts=constant(r, "num_experts", 1),
        top_k=constant(r, "moe_topk", 1, "num_experts_per_tok"),
        expert_ffn_dim=f,
        n_shared_experts=1,
        shared_ffn_dim=f,
    )
    return make(r, base, dense_ffn_dim=f, moe=moe, moe_ids=list(range(base["n_layers"])))


HUNYUAN_V1_MOE = ModelType("hunyuan_v1_moe", read=read)
