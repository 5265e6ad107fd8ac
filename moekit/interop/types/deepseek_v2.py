"""DeepSeek-V2 / V2-Lite (``deepseek_v2``): multi-head latent attention (MLA) + DeepSeekMoE.

``read_mla`` is shared by the MLA family (deepseek_v3, kimi_k2, ...): the attention of the DeepSeek-V2
paper §2.1.2 and the group-limited routing variants; ``write_mla`` writes the keys the family shares.

Loading follows transformers' ``modeling_deepseek_v2.py``, the oracle for HF checkpoints: softmax
scores, "greedy" top-k or "group_limited_greedy" (groups ranked by their best expert), weights
times ``routed_scaling_factor`` and never renormalised (transformers ignores ``norm_topk_prob``,
so moekit reads it as False), rotary pairs always interleaved (complex rotation), layer i MoE iff
``i >= first_k_dense_replace`` (transformers ignores ``moe_layer_freq``, so loading refuses one != 1).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from moekit.config import ConfigError, ModelConfig, MoEConfig
from moekit.interop.types._base import GATE_UP_DOWN, HFLayout, ModelType, refused
from moekit.interop.types._reader import Reader, common, make, mlp_bias_unsupported, placement
from moekit.interop.types._writer import common as write_common
from moekit.interop.types._writer import dense_first_shared_moe, require
from moekit.interop.types.deepseek import deepseek_moe_fields, deepseek_moe_ids

ARCHITECTURE = "DeepseekV2ForCausalLM"


def read_mla(r: Reader, v3: bool = False) -> ModelConfig:
    """An MLA + DeepSeekMoE config; ``v3``: the V3 defaults (sigmoid scores, noaux_tc routing)."""
    mlp_bias_unsupported(r)
    base = common(r, head_dim_key=False)
    q_lora = r.int("q_lora_rank", None)
    if q_lora == 0:  # DeepSeek's own inference configs write 0 for "no q compression"
        q_lora = None
    base["attention"] = {
        "n_heads": base["attention"]["n_heads"],
        "kind": "mla",
        "q_lora_rank": q_lora,
        "kv_lora_rank": r.int("kv_lora_rank"),
        "qk_nope_head_dim": r.int("qk_nope_head_dim"),
        "qk_rope_head_dim": r.int("qk_rope_head_dim"),
        "v_head_dim": r.int("v_head_dim"),
        "mla_bias": r.bool("attention_bias", False),
        # DeepSeek's checkpoints store rotary pairs interleaved (V2's complex rotary, V3's flag).
        "rope_interleave": r.bool("rope_interleave", True) if v3 else True,
        "rope_theta": base["attention"]["rope_theta"],
        "rope_scaling": base["attention"].get("rope_scaling"),
    }
    # transformers' DeepseekV3 always scores with a sigmoid, and configs it writes have no scoring_func.
    moe = deepseek_moe_fields(r, "sigmoid" if v3 else "softmax")
    if not v3:
        moe["norm_topk_prob"] = False  # transformers' DeepseekV2TopkRouter never renormalises
    method = r.get("topk_method", "noaux_tc" if v3 else "greedy")
    if method not in ("greedy", "group_limited_greedy", "noaux_tc"):
        raise ConfigError(
            f"{r.where}: 'topk_method' = {method!r} is not supported (greedy, group_limited_greedy, noaux_tc)"
        )
    if method != "greedy":
        # V2 ranks groups by their best expert, V3 by the sum of their two best.
        group_score = "max" if method == "group_limited_greedy" else "top2_sum"
        moe.update(n_group=r.int("n_group", 1), topk_group=r.int("topk_group", 1), group_score=group_score)
    # noaux_tc: DeepSeek-V3's e_score_correction_bias, a buffer steering selection only.
    moe["selection_bias"] = method == "noaux_tc"
    ids = deepseek_moe_ids(r, base["n_layers"])
    return make(r, base, dense_ffn_dim=r.int("intermediate_size"), moe=moe, moe_ids=ids)


def read_mla_v3(r: Reader) -> ModelConfig:
    """A DeepSeek-V3-style config whose MoE layers may be listed by ``mlp_layer_types``
    ("dense" / "sparse" per layer; transformers 5 writes it for V3.2, GLM-5, GLM-4.7-Flash)."""
    cfg = read_mla(r, v3=True)
    types = r.get("mlp_layer_types", None)
    if types is None:
        return cfg
    if not isinstance(types, list) or len(types) != cfg.n_layers:
        raise ConfigError(
            f"{r.where}: 'mlp_layer_types' must list 'dense' or 'sparse' for each of the {cfg.n_layers} layers"
        )
    ids = [i for i, t in enumerate(types) if t == "sparse"]
    if not ids:
        return dataclasses.replace(cfg, moe=None)
    moe = (
        dataclasses.asdict(cfg.moe)
        | {"first_k_dense": 0, "moe_every": 1, "moe_layers": None}
        | placement(cfg.n_layers, ids)
    )
    return dataclasses.replace(cfg, moe=MoEConfig(**moe))


def write_mla(cfg: ModelConfig, mt: str, architecture: str) -> tuple[MoEConfig, dict[str, Any]]:
    """The checks and keys DeepSeek-V2 and V3 share: MLA, dense layers first, ungated shared experts."""
    moe, out = write_common(cfg, mt, architecture)
    att = cfg.attention
    require(att.kind == "mla", "attention.kind", att.kind, mt, "'mla'")
    out.update(dense_first_shared_moe(cfg, mt))
    out.update(
        num_key_value_heads=att.n_heads,
        q_lora_rank=att.q_lora_rank,
        kv_lora_rank=att.kv_lora_rank,
        qk_nope_head_dim=att.qk_nope_head_dim,
        qk_rope_head_dim=att.qk_rope_head_dim,
        v_head_dim=att.v_head_dim,
        attention_bias=att.mla_bias,
    )
    return moe, out


def write(cfg: ModelConfig) -> dict[str, Any]:
    mt = "deepseek_v2"
    moe, out = write_mla(cfg, mt, ARCHITECTURE)
    att = cfg.attention
    require(att.rope_interleave, "attention.rope_interleave", False, mt, "True (V2 rotates interleaved pairs)")
    require(moe.score_func == "softmax", "moe.score_func", moe.score_func, mt, "'softmax'")
    require(not moe.norm_topk_prob, "moe.norm_topk_prob", True, mt, "False (transformers' V2 never renormalises)")
    require(not moe.uses_selection_bias, "moe.selection_bias", True, mt, "False")
    grouped = moe.n_group > 1
    if grouped:
        require(moe.group_score == "max", "moe.group_score", moe.group_score, mt, "'max' (group_limited_greedy)")
    out.update(topk_method="group_limited_greedy" if grouped else "greedy", moe_layer_freq=1)
    return out


def refuse(d: dict[str, Any]) -> None:
    """Settings DeepSeek's own code honours and transformers' DeepseekV2 ignores or cannot run."""
    if d.get("moe_layer_freq", 1) != 1:
        raise refused(d, "moe_layer_freq", "transformers' DeepSeek-V2 makes every layer after the dense ones MoE")
    if d.get("scoring_func", "softmax") != "softmax":
        raise refused(d, "scoring_func", "transformers' DeepSeek-V2 always scores with a softmax")
    if d.get("topk_method", "greedy") == "noaux_tc":
        raise refused(d, "topk_method", "transformers' DeepSeek-V2 has no e_score_correction_bias (use deepseek_v3)")
    if d.get("n_shared_experts", 2) in (0, None):
        raise refused(d, "n_shared_experts", "transformers builds a width-0 shared FFN that moekit does not have")


DEEPSEEK_V2 = ModelType(
    "deepseek_v2",
    read=read_mla,
    write=write,
    architecture=ARCHITECTURE,
    layout=HFLayout("mlp", GATE_UP_DOWN, shared="shared_experts"),
    refuse=refuse,
    claims=lambda cfg: cfg.attention.kind == "mla" and cfg.moe.score_func == "softmax",
)
