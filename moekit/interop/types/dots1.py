"""dots.llm1 (``dots1``): Qwen3's attention (per-head q/k RMSNorm, one ``attention_bias`` flag for
q/k/v/o, sliding windows from layer ``max_window_layers`` on) with DeepSeek-V3's MoE after
``first_k_dense_replace`` dense layers (sigmoid scores, group-limited top-k with a selection bias,
renormalised and scaled weights, ungated shared experts).

Source: transformers' ``modular_dots1.py``.
"""

from __future__ import annotations

from typing import Any

from moekit.config import ConfigError, ModelConfig
from moekit.interop.types._base import GATE_UP_DOWN, HFLayout, ModelType
from moekit.interop.types._reader import MISSING, Reader, common, make, mlp_bias_unsupported
from moekit.interop.types._writer import common as write_common
from moekit.interop.types._writer import require
from moekit.interop.types.glm4_moe import v3_moe_fields, write_moe

ARCHITECTURE = "Dots1ForCausalLM"
MT = "dots1"
LAYER_TYPES = ("sliding_attention", "full_attention")


def read(r: Reader) -> ModelConfig:
    mlp_bias_unsupported(r)
    base = common(r)
    n = base["n_layers"]
    att = base["attention"]
    bias = r.bool("attention_bias", False)
    att.update(qkv_bias=bias, o_bias=bias, qk_norm="head")
    window = r.int("sliding_window", None)
    types = r.get("layer_types", None)
    if types is None:
        first = r.int("max_window_layers", n)
        types = ["sliding_attention" if window is not None and i >= first else "full_attention" for i in range(n)]
    if not isinstance(types, list) or len(types) != n or any(t not in LAYER_TYPES for t in types):
        raise ConfigError(f"{r.where}: 'layer_types' must list {n} of {list(LAYER_TYPES)}, got {types!r}")
    sliding = [i for i, t in enumerate(types) if t == "sliding_attention"]
    if window is not None and sliding:
        att.update(sliding_window=window, sliding_layers=sliding)
    moe = v3_moe_fields(r, MISSING, False)
    ids = list(range(r.int("first_k_dense_replace", 0), n))
    return make(r, base, dense_ffn_dim=r.int("intermediate_size"), moe=moe if ids else None, moe_ids=ids)


def write(cfg: ModelConfig) -> dict[str, Any]:
    _, out = write_common(cfg, MT, ARCHITECTURE, writes=("attention.sliding_window",))
    att = cfg.attention
    require(att.kind == "gqa", "attention.kind", att.kind, MT, "'gqa'")
    require(att.qk_norm == "head", "attention.qk_norm", att.qk_norm, MT, "'head'")
    require(att.qkv_bias == att.o_bias, "attention.o_bias", att.o_bias, MT, f"{att.qkv_bias} (= qkv_bias)")
    out.update(write_moe(cfg, MT))
    out.update(
        attention_bias=att.qkv_bias,
        sliding_window=att.sliding_window,
        layer_types=["sliding_attention" if att.is_sliding(i) else "full_attention" for i in range(cfg.n_layers)],
    )
    return out


DOTS1 = ModelType(
    MT,
    read=read,
    write=write,
    architecture=ARCHITECTURE,
    layout=HFLayout("mlp", GATE_UP_DOWN, shared="shared_experts", selection_bias=True),
    claims=lambda cfg: cfg.attention.qk_norm == "head" and cfg.moe.score_func == "sigmoid",
)
