"""DeepSeek-V2 / V2-Lite (``deepseek_v2``): multi-head latent attention (MLA) + DeepSeekMoE.

``read_mla`` is shared by the MLA family (deepseek_v3, kimi_k2, ...): the attention of the DeepSeek-V2
paper §2.1.2 and the group-limited routing variants.
"""

from __future__ import annotations

import dataclasses

from moekit.config import ConfigError, ModelConfig, MoEConfig
from moekit.interop.types._base import ModelType
from moekit.interop.types._reader import Reader, common, make, mlp_bias_unsupported, placement
from moekit.interop.types.deepseek import deepseek_moe_fields, deepseek_moe_ids


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
        "rope_interleave": r.bool("rope_interleave", True),
        "rope_theta": base["attention"]["rope_theta"],
        "rope_scaling": base["attention"].get("rope_scaling"),
    }
    # transformers' DeepseekV3 always scores with a sigmoid, and configs it writes have no scoring_func.
    moe = deepseek_moe_fields(r, "sigmoid" if v3 else "softmax")
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


DEEPSEEK_V2 = ModelType("deepseek_v2", read=read_mla)
