"""Granite 3.0 MoE (``granitemoe``, IBM): Mixtral's layout (every layer a top-k MoE, no shared expert,
no biases) with tied embeddings; its embedding/residual/attention/logit multipliers scale
activations, not shapes."""

from __future__ import annotations

from moekit.config import ModelConfig
from moekit.interop.types._base import ModelType
from moekit.interop.types._reader import MISSING, Reader, common, make


def read(r: Reader) -> ModelConfig:
    base = common(r)
    bias = r.bool("attention_bias", False)
    base["attention"].update(qkv_bias=bias, o_bias=bias)
    moe = dict(
        n_routed_experts=r.int("num_local_experts", MISSING, "num_experts"),
        top_k=r.int("num_experts_per_tok"),
        expert_ffn_dim=r.int("intermediate_size"),
    )
    return make(r, base, dense_ffn_dim=r.int("intermediate_size"), moe=moe, moe_ids=list(range(base["n_layers"])))


GRANITEMOE = ModelType("granitemoe", read=read)
