"""Llama 4 (``llama4_text``, and the text part of the multimodal ``llama4``): interleaved MoE layers
with a shared expert as wide as a routed one, sigmoid top-k routing whose weight scales the
expert's *input*, NoPE layers, chunked attention on the rotary layers, L2 q/k norm and attention
temperature tuning.

Source: transformers' ``modeling_llama4.py``. ``no_rope_layers[i]`` is 1 for a rotary layer, 0 for
a NoPE one (default: every ``no_rope_layer_interval``-th layer is NoPE); the L2 q/k norm
(``use_qk_norm``) applies to rotary layers only and temperature tuning to NoPE layers only.
``layer_types`` (default: chunked on rotary layers when ``attention_chunk_size`` is set) marks the
chunked layers. Rotary pairs are interleaved (complex rotation). Checkpoints keep transformers'
fused experts, gate then up (``HFLayout.fused = "concat"``); every FFN module is ``feed_forward``.
The vision tower of a multimodal ``llama4`` config is not counted nor loaded.
"""

from __future__ import annotations

from typing import Any

from moekit.config import ConfigError, ModelConfig
from moekit.interop.types._base import GATE_UP_DOWN, HFLayout, ModelType
from moekit.interop.types._reader import MISSING, Reader, common, make
from moekit.interop.types._writer import common as write_common
from moekit.interop.types._writer import require

ARCHITECTURE = "Llama4ForCausalLM"
MT = "llama4_text"
LAYER_TYPES = ("full_attention", "chunked_attention")


def _nope_layers(r: Reader, n: int) -> list[int]:
    flags = r.get("no_rope_layers", None) or None
    if flags is None:
        interval = r.int("no_rope_layer_interval", 4)
        if interval < 1:
            raise ConfigError(f"{r.where}: 'no_rope_layer_interval' must be >= 1, got {interval}")
        return [i for i in range(n) if (i + 1) % interval == 0]
    if not isinstance(flags, list) or len(flags) != n or any(f not in (0, 1) for f in flags):
        raise ConfigError(f"{r.where}: 'no_rope_layers' must list {n} flags 0 or 1, got {flags!r}")
    return [i for i, f in enumerate(flags) if f == 0]


def read(r: Reader) -> ModelConfig:
    base = common(r)
    n = base["n_layers"]
    bias = r.bool("attention_bias", False)
    nope = _nope_layers(r, n)
    chunk = r.int("attention_chunk_size", None)
    types = r.get("layer_types", None)
    if types is None:
        types = ["chunked_attention" if i not in nope and chunk is not None else "full_attention" for i in range(n)]
    if not isinstance(types, list) or len(types) != n or any(t not in LAYER_TYPES for t in types):
        raise ConfigError(f"{r.where}: 'layer_types' must list {n} of {list(LAYER_TYPES)}, got {types!r}")
    chunked = [i for i, t in enumerate(types) if t == "chunked_attention"]
    base["attention"].update(
        qkv_bias=bias,
        o_bias=bias,
        qk_norm="l2" if r.bool("use_qk_norm", True) else "none",
        rope_interleave=True,
        nope_layers=nope or None,
        chunk_size=chunk if chunked else None,
        chunked_layers=chunked if chunk is not None and chunked else None,
        temperature_tuning=r.bool("attn_temperature_tuning", True),
        temperature_floor=r.int("floor_scale", 8192),
        temperature_scale=r.float("attn_scale", 0.1),
    )
    ids = r.int_list("moe_layers", None) if r.get("moe_layers", None) is not None else None
    if ids is None:
        step = r.int("interleave_moe_layer_step", 1)
        if step < 1:
            raise ConfigError(f"{r.where}: 'interleave_moe_layer_step' must be >= 1, got {step}")
        ids = list(range(step - 1, n, step))  # transformers' Llama4TextConfig
    f = r.int("intermediate_size")
    moe = dict(
        n_routed_experts=r.int("num_local_experts", MISSING, "num_experts"),
        top_k=r.int("num_experts_per_tok", 1),
        expert_ffn_dim=f,
        n_shared_experts=1,  # Llama4TextMoe.shared_expert, as wide as a routed expert
        shared_ffn_dim=f,
        score_func="sigmoid",
        norm_topk_prob=False,
        scale_expert_input=True,
    )
    return make(r, base, dense_ffn_dim=r.int("intermediate_size_mlp", f), moe=moe, moe_ids=ids)


def write(cfg: ModelConfig) -> dict[str, Any]:
    allow = ("attention.rope_interleave", "attention.chunk_size", "attention.nope_layers", "moe.scale_expert_input")
    moe, out = write_common(cfg, MT, ARCHITECTURE, allow)
    att = cfg.attention
    require(att.kind == "gqa", "attention.kind", att.kind, MT, "'gqa'")
    require(att.qk_norm in ("none", "l2"), "attention.qk_norm", att.qk_norm, MT, "'none' or 'l2'")
    require(att.qkv_bias == att.o_bias, "attention.o_bias", att.o_bias, MT, f"{att.qkv_bias} (= qkv_bias)")
    require(att.rope_interleave, "attention.rope_interleave", False, MT, "True (Llama 4 rotates interleaved pairs)")
    require(moe.score_func == "sigmoid", "moe.score_func", moe.score_func, MT, "'sigmoid'")
    require(not moe.norm_topk_prob, "moe.norm_topk_prob", True, MT, "False")
    require(moe.scale_expert_input, "moe.scale_expert_input", False, MT, "True")
    for field, value, ok, expected in [
        ("moe.routed_scaling_factor", moe.routed_scaling_factor, moe.routed_scaling_factor == 1.0, "1.0"),
        ("moe.n_group", moe.n_group, moe.n_group == 1, "1"),
        ("moe.selection_bias", moe.uses_selection_bias, not moe.uses_selection_bias, "False"),
        ("moe.shared_expert_gate", moe.shared_expert_gate, not moe.shared_expert_gate, "False"),
    ]:
        require(ok, field, value, MT, expected)
    ok = moe.n_shared_experts == 1 and moe.shared_ffn_dim == moe.expert_ffn_dim
    shared = (moe.n_shared_experts, moe.shared_ffn_dim)
    require(ok, "moe.n_shared_experts, moe.shared_ffn_dim", shared, MT, f"(1, {moe.expert_ffn_dim})")
    layers = range(cfg.n_layers)
    out.update(
        intermediate_size=moe.expert_ffn_dim,
        intermediate_size_mlp=cfg.dense_ffn_dim,
        num_local_experts=moe.n_routed_experts,
        moe_layers=cfg.moe_layer_ids,
        attention_bias=att.qkv_bias,
        use_qk_norm=att.qk_norm == "l2",
        no_rope_layers=[int(att.uses_rope(i)) for i in layers],
        attention_chunk_size=att.chunk_size,
        layer_types=["chunked_attention" if att.is_chunked(i) else "full_attention" for i in layers],
        attn_temperature_tuning=att.temperature_tuning,
        floor_scale=att.temperature_floor,
        attn_scale=att.temperature_scale,
    )
    return out


LLAMA4_TEXT = ModelType(
    MT,
    read=read,
    write=write,
    architecture=ARCHITECTURE,
    layout=HFLayout(
        "feed_forward", GATE_UP_DOWN, shared="shared_expert", router="router", dense="feed_forward", fused="concat"
    ),
    claims=lambda cfg: cfg.moe.scale_expert_input,
)
LLAMA4 = ModelType("llama4", sub_config="text_config", notes="the text part of the multimodal config")
