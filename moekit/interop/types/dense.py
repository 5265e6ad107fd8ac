"""Dense baselines: LLaMA, Mistral, Qwen2 and Qwen3 (``llama``, ``mistral``, ``qwen2``, ``qwen3``).

They differ only in attention biases (Qwen2: q/k/v, LLaMA: ``attention_bias`` for all four) and
Qwen3's per-head q/k norm.
"""

from __future__ import annotations

from moekit.config import ModelConfig
from moekit.interop.types._base import ModelType
from moekit.interop.types._reader import Reader, common, make, mlp_bias_unsupported


def read(r: Reader) -> ModelConfig:
    mlp_bias_unsupported(r)
    base = common(r)
    mt = r.d.get("model_type")
    bias = r.bool("attention_bias", False)
    if mt == "qwen2":  # q/k/v biases, no o bias
        base["attention"].update(qkv_bias=True)
    else:
        base["attention"].update(qkv_bias=bias, o_bias=bias)
    if mt == "qwen3":
        base["attention"]["qk_norm"] = "head"
    return make(r, base, dense_ffn_dim=r.int("intermediate_size"))


LLAMA = ModelType("llama", read=read)
MISTRAL = ModelType("mistral", read=read)
QWEN2 = ModelType("qwen2", read=read)
QWEN3 = ModelType("qwen3", read=read)
