"""GLM-4.5 / 4.6 (``glm4_moe``, Z.ai): GQA with q/k/v biases and optional per-head q/k norm, the first
``first_k_dense_replace`` layers dense, then DeepSeek-V3-style MoE (sigmoid scores, selection
bias, a shared expert); ``num_nextn_predict_layers`` MTP modules (out of the total). Its partial
rotary (``partial_rotary_factor``) changes no shapes."""

from __future__ import annotations

from moekit.config import ModelConfig
from moekit.interop.types._base import ModelType
from moekit.interop.types._reader import Reader, common, make
from moekit.interop.types.deepseek import mtp_extras


def deepseek_v3_moe(r: Reader) -> dict:
    """The MoE fields of DeepSeek-V3-style routers (sigmoid, group-limited, selection bias)."""
    return dict(
        n_routed_experts=r.int("n_routed_experts"),
        top_k=r.int("num_experts_per_tok"),
        expert_ffn_dim=r.int("moe_intermediate_size"),
        n_shared_experts=r.int("n_shared_experts", 0),
        score_func="sigmoid",
        norm_topk_prob=r.bool("norm_topk_prob", True),
        routed_scaling_factor=r.float("routed_scaling_factor", 1.0),
        n_group=r.int("n_group", 1),
        topk_group=r.int("topk_group", 1),
        group_score="top2_sum",
        selection_bias=True,
    )


def read(r: Reader) -> ModelConfig:
    base = common(r)
    if base["attention"]["head_dim"] is None:  # transformers: hidden_size // num_attention_heads, floored
        base["attention"]["head_dim"] = base["d_model"] // base["attention"]["n_heads"]
    base["attention"].update(
        qkv_bias=r.bool("attention_bias", False), qk_norm="head" if r.bool("use_qk_norm", False) else "none"
    )
    first = r.int("first_k_dense_replace", 1)
    ids = list(range(first, base["n_layers"]))
    return make(r, base, dense_ffn_dim=r.int("intermediate_size"), moe=deepseek_v3_moe(r), moe_ids=ids)


GLM4_MOE = ModelType("glm4_moe", read=read, extras=mtp_extras)
