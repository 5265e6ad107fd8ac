"""DeepSeekMoE (``deepseek``, remote code, not in transformers): LLaMA attention + the DeepSeekMoE FFN.

Also the MoE rules the DeepSeek family shares (V2, V3, Kimi-K2, ...): layer placement
(``first_k_dense_replace``, ``moe_layer_freq``) and the router/expert fields. Source: DeepSeek's
``modeling_deepseek.py``.
"""

from __future__ import annotations

from typing import Any

from moekit.accounting import Component, mtp_component
from moekit.config import ConfigError, ModelConfig
from moekit.interop.types._base import ModelType
from moekit.interop.types._reader import Reader, common, make, mlp_bias_unsupported


def deepseek_moe_ids(r: Reader, n_layers: int) -> list[int]:
    """Layer i is MoE iff n_routed_experts is set, i >= first_k_dense_replace and i % moe_layer_freq == 0."""
    if r.int("n_routed_experts", 0) <= 0:
        return []
    first = r.int("first_k_dense_replace", 0)
    freq = r.int("moe_layer_freq", 1)
    if freq < 1:
        raise ConfigError(f"{r.where}: 'moe_layer_freq' must be >= 1, got {freq}")
    return [i for i in range(n_layers) if i >= first and i % freq == 0]


def deepseek_moe_fields(r: Reader, default_score: str = "softmax") -> dict[str, Any]:
    n_shared = r.int("n_shared_experts", 0)
    score = r.get("scoring_func", default_score)
    if score not in ("softmax", "sigmoid"):
        raise ConfigError(f"{r.where}: 'scoring_func' = {score!r} is not supported (softmax or sigmoid)")
    return dict(
        n_routed_experts=r.int("n_routed_experts", 1),
        top_k=r.int("num_experts_per_tok", 1),
        expert_ffn_dim=r.int("moe_intermediate_size", 1),
        n_shared_experts=n_shared,
        score_func=score,
        norm_topk_prob=r.bool("norm_topk_prob", False),
        routed_scaling_factor=r.float("routed_scaling_factor", 1.0),
    )


def mtp_extras(r: Reader, cfg: ModelConfig) -> list[Component]:
    """The multi-token-prediction modules of ``num_nextn_predict_layers`` (out of the total)."""
    n = r.int("num_nextn_predict_layers", 0)
    return [mtp_component(cfg, n)] if n > 0 and cfg.moe is not None else []


def read(r: Reader) -> ModelConfig:
    mlp_bias_unsupported(r)
    base = common(r)
    bias = r.bool("attention_bias", False)
    base["attention"].update(qkv_bias=bias, o_bias=bias)
    ids = deepseek_moe_ids(r, base["n_layers"])
    return make(r, base, dense_ffn_dim=r.int("intermediate_size"), moe=deepseek_moe_fields(r), moe_ids=ids)


DEEPSEEK = ModelType("deepseek", read=read, notes="DeepSeekMoE 16B / 145B remote code")
