"""Llama 4 (``llama4_text``, and the text part of the multimodal ``llama4``): interleaved MoE layers with
a shared expert as wide as a routed one, sigmoid scores, L2 q/k norm (no parameters).

The vision tower of a multimodal ``llama4`` config is not counted. Its no-rope layers and chunked
attention change behaviour, not parameters.
"""

from __future__ import annotations

from moekit.config import ConfigError, ModelConfig
from moekit.interop.types._base import ModelType
from moekit.interop.types._reader import MISSING, Reader, common, make


def read(r: Reader) -> ModelConfig:
    base = common(r)
    bias = r.bool("attention_bias", False)
    base["attention"].update(qkv_bias=bias, o_bias=bias, qk_norm="l2" if r.bool("use_qk_norm", True) else "none")
    n_layers = base["n_layers"]
    ids = r.int_list("moe_layers", None) if r.get("moe_layers", None) is not None else None
    if ids is None:
        step = r.int("interleave_moe_layer_step", 1)
        if step < 1:
            raise ConfigError(f"{r.where}: 'interleave_moe_layer_step' must be >= 1, got {step}")
        ids = list(range(step - 1, n_layers, step))  # transformers' Llama4TextConfig
    f = r.int("intermediate_size")
    moe = dict(
        n_routed_experts=r.int("num_local_experts", MISSING, "num_experts"),
        top_k=r.int("num_experts_per_tok", 1),
        expert_ffn_dim=f,
        n_shared_experts=1,  # Llama4TextMoe.shared_expert, as wide as a routed expert
        shared_ffn_dim=f,
        score_func="sigmoid",
        norm_topk_prob=False,
    )
    return make(r, base, dense_ffn_dim=r.int("intermediate_size_mlp", f), moe=moe, moe_ids=ids)


LLAMA4_TEXT = ModelType("llama4_text", read=read)
LLAMA4 = ModelType("llama4", sub_config="text_config", notes="the text part of the multimodal config")
