"""dots.llm1 (``dots1``, rednote): per-head q/k norm, the first ``first_k_dense_replace`` layers dense,
then DeepSeek-V3-style MoE (sigmoid scores, selection bias, shared experts)."""

from __future__ import annotations

from moekit.config import ModelConfig
from moekit.interop.types._base import ModelType
from moekit.interop.types._reader import Reader, common, make
from moekit.interop.types.glm4_moe import deepseek_v3_moe


def read(r: Reader) -> ModelConfig:
    base = common(r)
    bias = r.bool("attention_bias", False)
    base["attention"].update(qkv_bias=bias, o_bias=bias, qk_norm="head")
    first = r.int("first_k_dense_replace", 0)
    ids = list(range(first, base["n_layers"]))
    return make(r, base, dense_ffn_dim=r.int("intermediate_size"), moe=deepseek_v3_moe(r), moe_ids=ids)


DOTS1 = ModelType("dots1", read=read)
