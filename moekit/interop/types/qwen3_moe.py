"""Qwen3-MoE (``qwen3_moe``): per-head q/k RMSNorm, softmax top-k routed experts, no shared expert."""

from __future__ import annotations

from typing import Any

from moekit.config import ModelConfig
from moekit.interop.types._base import GATE_UP_DOWN, HFLayout, ModelType
from moekit.interop.types._reader import Reader, common, make
from moekit.interop.types._writer import common as write_common
from moekit.interop.types._writer import gqa, qwen_placement, require, softmax_router
from moekit.interop.types.qwen2_moe import qwen_moe_ids, refuse_sliding_window

ARCHITECTURE = "Qwen3MoeForCausalLM"


def read(r: Reader) -> ModelConfig:
    base = common(r)
    bias = r.bool("attention_bias", False)
    base["attention"].update(qkv_bias=bias, o_bias=bias, qk_norm="head")
    e = r.int("num_experts", 0, "num_local_experts")
    moe = dict(
        n_routed_experts=max(e, 1),
        top_k=r.int("num_experts_per_tok", 1),
        expert_ffn_dim=r.int("moe_intermediate_size", 1),
        norm_topk_prob=r.bool("norm_topk_prob", False),
    )
    ids = qwen_moe_ids(r, base["n_layers"], e)
    return make(r, base, dense_ffn_dim=r.int("intermediate_size"), moe=moe if ids else None, moe_ids=ids)


def write(cfg: ModelConfig) -> dict[str, Any]:
    moe, out = write_common(cfg, "qwen3_moe", ARCHITECTURE)
    bias = gqa(cfg, "qwen3_moe", "head", "all")
    softmax_router(cfg, moe, "qwen3_moe")
    require(moe.n_shared_experts == 0, "moe.n_shared_experts", moe.n_shared_experts, "qwen3_moe", "0")
    out.update(
        intermediate_size=cfg.dense_ffn_dim,
        moe_intermediate_size=moe.expert_ffn_dim,
        num_experts=moe.n_routed_experts,
        norm_topk_prob=moe.norm_topk_prob,
        attention_bias=bias,
        use_sliding_window=False,
        **qwen_placement(cfg),
    )
    return out


QWEN3_MOE = ModelType(
    "qwen3_moe",
    read=read,
    write=write,
    architecture=ARCHITECTURE,
    layout=HFLayout("mlp", GATE_UP_DOWN),
    refuse=refuse_sliding_window,
    claims=lambda cfg: (
        cfg.attention.kind != "mla" and not cfg.moe.shared_expert_gate and cfg.attention.qk_norm == "head"
    ),
)
