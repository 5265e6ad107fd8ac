"""DeepSeek-V3 / R1 (``deepseek_v3``): MLA + DeepSeekMoE with sigmoid scores, group-limited routing
and an aux-free selection bias; its multi-token-prediction layers (``num_nextn_predict_layers``,
numbered after the last layer) are not part of the model, as in transformers."""

from __future__ import annotations

from typing import Any

from moekit.config import ModelConfig
from moekit.interop.types._base import GATE_UP_DOWN, HFLayout, ModelType, refused
from moekit.interop.types._reader import Reader
from moekit.interop.types._writer import require
from moekit.interop.types.deepseek import mtp_extras
from moekit.interop.types.deepseek_v2 import read_mla, write_mla

ARCHITECTURE = "DeepseekV3ForCausalLM"


def read(r: Reader) -> ModelConfig:
    return read_mla(r, v3=True)


def write(cfg: ModelConfig) -> dict[str, Any]:
    mt = "deepseek_v3"
    moe, out = write_mla(cfg, mt, ARCHITECTURE)
    require(moe.score_func == "sigmoid", "moe.score_func", moe.score_func, mt, "'sigmoid'")
    require(moe.group_score == "top2_sum", "moe.group_score", moe.group_score, mt, "'top2_sum'")
    per_group = moe.n_routed_experts // moe.n_group
    require(per_group >= 2, "moe.n_group", moe.n_group, mt, "at least 2 experts per group")
    out.update(rope_interleave=cfg.attention.rope_interleave)
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
