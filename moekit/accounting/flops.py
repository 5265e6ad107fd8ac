"""FLOPs and memory of a model: forward/training FLOPs per token, weight bytes, KV cache.

- FLOPs: forward = 2 × (matmul weights a token meets) + attention scores and values
  (Kaplan et al. 2020, Table 1: ``2N + 2·n_layer·n_ctx·d_attn``); training = 3 × forward
  (backward is twice the forward). The attention term uses the *full* context by default, as
  Kaplan, Chinchilla (Hoffmann et al. 2022, App. F) and DeepSeek LLM (2024, §3.1:
  ``M = 72·n_layer·d² + 12·n_layer·d·l_seq``) do; ``causal=True`` uses the mean causal
  context ``(S + 1) / 2`` instead.
- Memory: weights = total parameters × bytes per parameter; the KV cache per token holds K and V
  (``2·G·hd`` values) per attention layer, or for MLA the compressed latent plus the shared
  rotary key (``kv_lora_rank + qk_rope_head_dim``, DeepSeek-V2 paper Table 1). Sliding-window
  layers (gpt-oss) keep only their last ``window`` tokens: a fixed size, apart. Linear-attention
  and Mamba layers keep a fixed-size state, not a per-token cache: they add nothing here.

Every function takes a ``ModelConfig`` or a ``Counted`` (a model counted without one).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from moekit.accounting.counts import AttentionShape, Counted, ParamCount
from moekit.accounting.params import attention_shape, count_params
from moekit.config import ConfigError, ModelConfig

# Bytes per stored value, for weights and KV cache.
DTYPE_BYTES: dict[str, int] = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1}
WEIGHT_DTYPES = ("fp32", "bf16", "fp8")

Model = ModelConfig | Counted


@dataclass(frozen=True)
class FlopCount:
    """FLOPs at sequence length ``seq_len`` (multiply-add = 2 FLOPs). ``attention_per_token`` is
    None when the attention layers are unknown (then forward covers the matmuls only)."""

    seq_len: int
    causal: bool  # attention context: mean causal (S+1)/2 if True, full S if False
    matmul_per_token: int  # 2 × ParamCount.matmul_active
    attention_per_token: int | None  # q·k scores and probs·v over the context, all layers
    forward_per_token: int
    train_per_token: int  # 3 × forward (forward + backward)
    train_per_sequence: int  # train_per_token × seq_len: the DeepSeekMoE "FLOPs per 4K tokens"


def params_of(model: Model) -> ParamCount:
    return model.params if isinstance(model, Counted) else count_params(model)


def attention_shapes(model: Model) -> tuple[AttentionShape, ...] | None:
    """The attention layers of ``model`` (None when not known)."""
    if isinstance(model, Counted):
        return model.attention
    a = model.attention
    n_sliding = sum(a.is_sliding(i) for i in range(model.n_layers))
    if n_sliding == 0:
        return (attention_shape(a, model.n_layers),)
    windowed = dataclasses.replace(attention_shape(a, n_sliding), window=a.sliding_window)
    if n_sliding == model.n_layers:
        return (windowed,)
    return (attention_shape(a, model.n_layers - n_sliding), windowed)


def count_flops(model: Model, seq_len: int = 4096, *, causal: bool = False) -> FlopCount:
    """Forward and training FLOPs per token at context ``seq_len``.

    forward/token = 2·N_matmul + attention, with N_matmul = ``ParamCount.matmul_active``
    (embedding lookup excluded, output head and routers included) and
    attention = 2·L·H·(d_qk + d_v)·S (full context) or L·H·(d_qk + d_v)·(S + 1) (causal mean).
    Sliding-window layers see min(S, window) keys (causal: (min(S, window) + 1), exact for S <=
    window, a slight overcount past it); chunked attention is not modelled (the full context is charged).

    ``train_per_sequence`` (= 3 × forward × S) is the convention of the DeepSeekMoE paper's
    "FLOPs per 4K tokens" (6·N + 12·L·d·S per token, DeepSeek LLM §3.1). Checked in the tests:
    DeepSeekMoE 145B: 586.3T here vs 585.6T published (0.1%, the paper seemingly omits the
    router); 2B: 4.33T per 2K tokens vs 4.3T. The 16B gives 75.9T vs 74.4T published: the paper
    computed it from nominal sizes (each expert 0.25 of an 8·d² FFN, every layer MoE: 120·L·d²
    + 12·L·d·S + 6·V·d = 74.42T), while the released model's experts are 1408 wide (2.06·d²).
    """
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ConfigError(f"seq_len must be a positive integer, got {seq_len!r}")
    p = params_of(model)
    shapes = attention_shapes(model)
    attention: int | None = None
    if shapes is not None:
        attention = 0
        for s in shapes:
            per_layer = s.n_heads * (s.d_qk + s.d_v)
            ctx = seq_len if s.window is None else min(seq_len, s.window)  # a window caps the keys
            if causal:
                attention += s.n_layers * per_layer * (ctx + 1)  # 2·per_layer·(S+1)/2, exact without a window
            else:
                attention += 2 * s.n_layers * per_layer * ctx
    matmul = 2 * p.matmul_active
    forward = matmul + (attention or 0)
    return FlopCount(
        seq_len=seq_len,
        causal=causal,
        matmul_per_token=matmul,
        attention_per_token=attention,
        forward_per_token=forward,
        train_per_token=3 * forward,
        train_per_sequence=3 * forward * seq_len,
    )


def dtype_bytes(dtype: str) -> int:
    if dtype not in DTYPE_BYTES:
        raise ConfigError(f"unknown dtype {dtype!r}; known: {', '.join(DTYPE_BYTES)}")
    return DTYPE_BYTES[dtype]


def weights_bytes(model: Model, dtypes: tuple[str, ...] = WEIGHT_DTYPES) -> dict[str, int]:
    """Weight memory (total parameters × bytes per parameter) for each dtype."""
    total = params_of(model).total
    return {dt: total * dtype_bytes(dt) for dt in dtypes}


def kv_cache_values_per_token(model: Model) -> int | None:
    """Cached values per token over all attention layers but the sliding-window ones, whose cache
    is a fixed ``window``-token ring (``kv_cache_window_bytes``). None when the layers are unknown."""
    shapes = attention_shapes(model)
    return None if shapes is None else sum(s.n_layers * s.kv_values for s in shapes if s.window is None)


def kv_cache_window_bytes(model: Model, dtype: str = "bf16") -> int:
    """Bytes the sliding-window layers cache in all, per sequence, once it is ``window`` tokens long."""
    shapes = attention_shapes(model) or ()
    return sum(s.n_layers * s.kv_values * s.window for s in shapes if s.window is not None) * dtype_bytes(dtype)


def kv_cache_bytes_per_token(model: Model, dtype: str = "bf16") -> int | None:
    """KV-cache bytes per token at ``dtype`` (bf16 by default)."""
    values = kv_cache_values_per_token(model)
    return None if values is None else values * dtype_bytes(dtype)
