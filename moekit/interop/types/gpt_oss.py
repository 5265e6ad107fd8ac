"""gpt-oss (``gpt_oss``): attention sinks and biases, biased router and experts in every layer.

Its clamped SwiGLU changes behaviour, not parameters: counted, not built faithfully.
"""

from __future__ import annotations

from moekit.config import ModelConfig
from moekit.interop.types._base import ModelType
from moekit.interop.types._reader import MISSING, Reader, common, make


def read(r: Reader) -> ModelConfig:
    base = common(r)
    bias = r.bool("attention_bias", True)
    base["attention"].update(qkv_bias=bias, o_bias=bias, sinks=True)
    moe = dict(
        n_routed_experts=r.int("num_local_experts", MISSING, "num_experts"),
        top_k=r.int("num_experts_per_tok", MISSING, "experts_per_token"),
        expert_ffn_dim=r.int("intermediate_size"),
        router_bias=True,
        expert_bias=True,
    )
    return make(r, base, dense_ffn_dim=r.int("intermediate_size"), moe=moe, moe_ids=list(range(base["n_layers"])))


GPT_OSS = ModelType("gpt_oss", read=read)
