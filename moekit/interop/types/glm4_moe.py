"""GLM-4.5 / GLM-4.6 (``glm4_moe``): GQA with partial rotary, optional per-head q/k norm and q/k/v
biases; dense layers first, then DeepSeek-V3's MoE (sigmoid scores, group-limited top-k with a
selection bias, renormalised and scaled weights, ungated shared experts).

Source: transformers' ``modeling_glm4_moe.py``. Rotary covers the first ``partial_rotary_factor``
of each head (0.5 when the config does not say); ``attention_bias`` puts biases on q/k/v, never on
o. The router always keeps an ``e_score_correction_bias``. Multi-token-prediction layers
(``num_nextn_predict_layers``, numbered after the last layer) are not part of the loaded model;
accounting counts them as extras (out of the total), as DeepSeek-V3's.
"""

from __future__ import annotations

from typing import Any

from moekit.config import ConfigError, ModelConfig
from moekit.interop.types._base import GATE_UP_DOWN, HFLayout, ModelType
from moekit.interop.types._reader import MISSING, Reader, common, make, mlp_bias_unsupported, partial_rotary_factor
from moekit.interop.types._writer import common as write_common
from moekit.interop.types._writer import dense_first_shared_moe, require
from moekit.interop.types.deepseek import mtp_extras

ARCHITECTURE = "Glm4MoeForCausalLM"
MT = "glm4_moe"


def read(r: Reader) -> ModelConfig:
    mlp_bias_unsupported(r)
    base = common(r)
    att = base["attention"]
    if att["head_dim"] is None:  # transformers: hidden_size // num_attention_heads, rounded down
        att["head_dim"] = base["d_model"] // att["n_heads"]
    att.update(
        qkv_bias=r.bool("attention_bias", False),
        qk_norm="head" if r.bool("use_qk_norm", False) else "none",
        partial_rotary_factor=partial_rotary_factor(r, 0.5),
    )
    moe = v3_moe_fields(r, 1, True)
    n = base["n_layers"]
    ids = list(range(r.int("first_k_dense_replace", 1), n))
    return make(r, base, dense_ffn_dim=r.int("intermediate_size"), moe=moe if ids else None, moe_ids=ids)


def v3_moe_fields(r: Reader, n_shared_default: Any, norm_default: bool) -> dict[str, Any]:
    """DeepSeek-V3's MoE as GLM-4.5 and dots.llm1 configure it: sigmoid scores, group-limited top-k
    with a selection bias (``e_score_correction_bias``), renormalised and scaled weights."""
    n_shared = r.int("n_shared_experts", n_shared_default)
    if n_shared <= 0:
        # transformers still builds a width-0 shared FFN (empty tensors moekit does not have).
        raise ConfigError(f"{r.where}: 'n_shared_experts' = {n_shared} is not supported (need >= 1)")
    return dict(
        n_routed_experts=r.int("n_routed_experts", MISSING, "num_local_experts"),
        top_k=r.int("num_experts_per_tok"),
        expert_ffn_dim=r.int("moe_intermediate_size"),
        n_shared_experts=n_shared,
        score_func="sigmoid",
        norm_topk_prob=r.bool("norm_topk_prob", norm_default),
        routed_scaling_factor=r.float("routed_scaling_factor", 1.0),
        n_group=r.int("n_group", 1),
        topk_group=r.int("topk_group", 1),
        group_score="top2_sum",
        selection_bias=True,
    )


def write_moe(cfg: ModelConfig, mt: str) -> dict[str, Any]:
    """The DeepSeek-V3-style MoE keys GLM-4.5 and dots.llm1 share (sigmoid, groups, selection bias)."""
    moe = cfg.moe
    assert moe is not None
    require(moe.score_func == "sigmoid", "moe.score_func", moe.score_func, mt, "'sigmoid'")
    if moe.n_group > 1:
        require(moe.group_score == "top2_sum", "moe.group_score", moe.group_score, mt, "'top2_sum'")
        per_group = moe.n_routed_experts // moe.n_group
        require(per_group >= 2, "moe.n_group", moe.n_group, mt, "at least 2 experts per group")
    return dense_first_shared_moe(cfg, mt)


def write(cfg: ModelConfig) -> dict[str, Any]:
    _, out = write_common(cfg, MT, ARCHITECTURE, writes=("attention.partial_rotary_factor",))
    att = cfg.attention
    require(att.kind == "gqa", "attention.kind", att.kind, MT, "'gqa'")
    require(att.qk_norm in ("none", "head"), "attention.qk_norm", att.qk_norm, MT, "'none' or 'head'")
    require(not att.o_bias, "attention.o_bias", att.o_bias, MT, "False (attention_bias is on q/k/v only)")
    out.update(write_moe(cfg, MT))
    out.update(
        attention_bias=att.qkv_bias,
        use_qk_norm=att.qk_norm == "head",
        partial_rotary_factor=att.partial_rotary_factor,
        num_nextn_predict_layers=0,
    )
    return out


def claims(cfg: ModelConfig) -> bool:
    """GQA with a DeepSeek-V3-style router or shared experts that no Qwen/Mixtral type has."""
    a, m = cfg.attention, cfg.moe
    return (
        a.kind == "gqa"
        and not m.shared_expert_gate
        and (m.score_func == "sigmoid" or a.partial_rotary_factor != 1.0 or m.n_shared_experts > 0)
    )


GLM4_MOE = ModelType(
    MT,
    read=read,
    extras=mtp_extras,
    write=write,
    architecture=ARCHITECTURE,
    layout=HFLayout("mlp", GATE_UP_DOWN, shared="shared_experts", selection_bias=True),
    claims=claims,
    partial_rotary=True,
)
