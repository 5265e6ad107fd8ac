"""DeepSeek-V3 / R1 (``deepseek_v3``): MLA + DeepSeekMoE with sigmoid scores, group-limited routing
and an aux-free selection bias; its multi-token-prediction layers (``num_nextn_predict_layers``,
numbered after the last layer) are not part of the model, as in transformers."""

from __future__ import annotations

from typing import Any

from moekit.config import ModelConfig
from moekit.interop.types._base import GATE_UP_DOWN, HFLayout, ModelType, refused
from moekit.interop.types._reader import Reader
from moekit.interop.types._writer import common as write_common
from moekit.interop.types._writer import require
from moekit.interop.types.deepseek import mtp_extras
from moekit.interop.types.deepseek_v2 import read_mla

ARCHITECTURE = "DeepseekV3ForCausalLM"


def read(r: Reader) -> ModelConfig:
    return read_mla(r, v3=True)


def write(cfg: ModelConfig) -> dict[str, Any]:
    mt = "deepseek_v3"
    moe, out = write_common(cfg, mt, ARCHITECTURE)
    att = cfg.attention
    require(att.kind == "mla", "attention.kind", att.kind, mt, "'mla'")
    require(moe.score_func == "sigmoid", "moe.score_func", moe.score_func, mt, "'sigmoid'")
    require(moe.group_score == "top2_sum", "moe.group_score", moe.group_score, mt, "'top2_sum'")
    per_group = moe.n_routed_experts // moe.n_group
    require(per_group >= 2, "moe.n_group", moe.n_group, mt, "at least 2 experts per group")
    first = cfg.n_dense_layers
    require(
        cfg.moe_layer_ids == list(range(first, cfg.n_layers)),
        "moe layers",
        cfg.moe_layer_ids,
        mt,
        "dense layers first, then only MoE layers",
    )
    assert moe.shared_ffn_dim is not None
    shared_width = moe.n_shared_experts * moe.shared_ffn_dim
    ok = moe.n_shared_experts > 0 and shared_width % moe.expert_ffn_dim == 0
    multiple = f"a positive multiple of moe.expert_ffn_dim ({moe.expert_ffn_dim})"
    require(ok, "moe.n_shared_experts * moe.shared_ffn_dim", shared_width, mt, multiple)
    out.update(
        num_key_value_heads=att.n_heads,
        intermediate_size=cfg.dense_ffn_dim,
        moe_intermediate_size=moe.expert_ffn_dim,
        n_routed_experts=moe.n_routed_experts,
        n_shared_experts=shared_width // moe.expert_ffn_dim,
        first_k_dense_replace=first,
        n_group=moe.n_group,
        topk_group=moe.topk_group,
        norm_topk_prob=moe.norm_topk_prob,
        routed_scaling_factor=moe.routed_scaling_factor,
        q_lora_rank=att.q_lora_rank,
        kv_lora_rank=att.kv_lora_rank,
        qk_nope_head_dim=att.qk_nope_head_dim,
        qk_rope_head_dim=att.qk_rope_head_dim,
        v_head_dim=att.v_head_dim,
        attention_bias=att.mla_bias,
        rope_interleave=att.rope_interleave,
    )
    return out


def refuse(d: dict[str, Any]) -> None:
    if d.get("scoring_func", "sigmoid") != "sigmoid":
        raise refused(d, "scoring_func", "transformers' DeepSeek-V3 always scores with a sigmoid")


DEEPSEEK_V3 = ModelType(
    "deepseek_v3",
    read=read,
    write=write,
    architecture=ARCHITECTURE,
    layout=HFLayout("mlp", GATE_UP_DOWN, shared="shared_experts", selection_bias=True),
    refuse=refuse,
    claims=lambda cfg: cfg.attention.kind == "mla",
    extras=mtp_extras,
)
