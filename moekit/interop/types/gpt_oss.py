"""gpt-oss (``gpt_oss``): GQA with attention sinks and biases, sliding-window attention on alternate
layers, and in every layer a biased softmax top-k router over experts with biases and a clamped
SwiGLU (``g * sigmoid(1.702 g) * (u + 1)``, g <= 7, |u| <= 7).

Source: transformers' ``modeling_gpt_oss.py``. The router is top-k of the logits then a softmax
over the chosen, which is moekit's softmax -> top-k -> renormalise. ``layer_types`` says which
layers slide (default: even layers, as transformers' GptOssConfig), over ``sliding_window``
slots. Rope defaults to YaRN with an untruncated ramp (``truncate: false``). Checkpoints keep only
transformers' fused expert tensors, gate and up interleaved (``HFLayout.fused``); the released
MXFP4 checkpoints are refused (their ``quantization_config``): load a dequantised (bf16) copy.
"""

from __future__ import annotations

from typing import Any

from moekit.config import ConfigError, ModelConfig
from moekit.interop.types._base import HFLayout, ModelType
from moekit.interop.types._reader import MISSING, Reader, common, make
from moekit.interop.types._writer import all_moe, require, softmax_router
from moekit.interop.types._writer import common as write_common

ARCHITECTURE = "GptOssForCausalLM"
MT = "gpt_oss"
# transformers' GptOssConfig default when a config has no rope settings at all.
DEFAULT_ROPE = {
    "rope_type": "yarn",
    "factor": 32.0,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "truncate": False,
    "original_max_position_embeddings": 4096,
}
LAYER_TYPES = ("sliding_attention", "full_attention")


def sliding_layers(r: Reader, n_layers: int) -> list[int]:
    types = r.get("layer_types", None)
    if types is None:
        return [i for i in range(n_layers) if (i + 1) % 2]
    if not isinstance(types, list) or len(types) != n_layers or any(t not in LAYER_TYPES for t in types):
        raise ConfigError(f"{r.where}: 'layer_types' must list {n_layers} of {list(LAYER_TYPES)}, got {types!r}")
    return [i for i, t in enumerate(types) if t == "sliding_attention"]


def read(r: Reader) -> ModelConfig:
    base = common(r)
    att = base["attention"]
    bias = r.bool("attention_bias", True)
    att.update(qkv_bias=bias, o_bias=bias, sinks=True)
    if r.get("rope_parameters", None) is None and r.get("rope_scaling", None) is None:
        att["rope_scaling"] = dict(DEFAULT_ROPE)
    window = r.int("sliding_window", None)
    sliding = sliding_layers(r, base["n_layers"])
    if window is not None and sliding:
        att.update(sliding_window=window, sliding_layers=sliding)
    moe = dict(
        n_routed_experts=r.int("num_local_experts", MISSING, "num_experts"),
        top_k=r.int("num_experts_per_tok", MISSING, "experts_per_token"),
        expert_ffn_dim=r.int("intermediate_size"),
        router_bias=True,
        expert_bias=True,
        expert_activation="clamped_swiglu",
        swiglu_alpha=r.float("swiglu_alpha", 1.702),
        swiglu_limit=r.float("swiglu_limit", 7.0),
    )
    return make(r, base, dense_ffn_dim=r.int("intermediate_size"), moe=moe, moe_ids=list(range(base["n_layers"])))


def write(cfg: ModelConfig) -> dict[str, Any]:
    allow = (
        "attention.sinks",
        "moe.router_bias",
        "moe.expert_bias",
        "moe.expert_activation",
        "attention.sliding_window",
    )
    moe, out = write_common(cfg, MT, ARCHITECTURE, allow)
    att = cfg.attention
    require(att.kind == "gqa", "attention.kind", att.kind, MT, "'gqa'")
    require(att.qk_norm == "none", "attention.qk_norm", att.qk_norm, MT, "'none'")
    require(att.qkv_bias == att.o_bias, "attention.o_bias", att.o_bias, MT, f"{att.qkv_bias} (= qkv_bias)")
    require(att.sinks, "attention.sinks", att.sinks, MT, "True")
    softmax_router(cfg, moe, MT)
    require(moe.norm_topk_prob, "moe.norm_topk_prob", False, MT, "True")
    require(moe.router_bias, "moe.router_bias", False, MT, "True")
    require(moe.expert_bias, "moe.expert_bias", False, MT, "True")
    require(
        moe.expert_activation == "clamped_swiglu",
        "moe.expert_activation",
        moe.expert_activation,
        MT,
        "'clamped_swiglu'",
    )
    require(moe.n_shared_experts == 0, "moe.n_shared_experts", moe.n_shared_experts, MT, "0")
    all_moe(cfg, MT)
    types = ["sliding_attention" if att.is_sliding(i) else "full_attention" for i in range(cfg.n_layers)]
    out.update(
        intermediate_size=moe.expert_ffn_dim,
        num_local_experts=moe.n_routed_experts,
        attention_bias=att.qkv_bias,
        swiglu_alpha=moe.swiglu_alpha,
        swiglu_limit=moe.swiglu_limit,
        sliding_window=att.sliding_window,
        layer_types=types,
    )
    if att.rope_scaling is None:  # transformers would read "no rope settings" as its YaRN default
        out["rope_scaling"] = {"rope_type": "default"}
    return out


GPT_OSS = ModelType(
    MT,
    read=read,
    write=write,
    architecture=ARCHITECTURE,
    layout=HFLayout("mlp", ("gate_proj", "up_proj", "down_proj"), router="router", fused="interleaved"),
    claims=lambda cfg: cfg.attention.sinks or cfg.moe.expert_activation == "clamped_swiglu",
)
