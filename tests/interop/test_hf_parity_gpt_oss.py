"""gpt-oss against transformers (see ``hf_oracle`` for the checks), plus its sliding-window cache.

Every option on, odd sizes: attention sinks, q/k/v/o biases, sliding windows of 5 slots on
alternate layers (inputs of 24-40 tokens, so windows bite), YaRN with an untruncated ramp, a
biased router, biased experts and a clamped SwiGLU whose limit the activations actually reach.
"""

from __future__ import annotations

import pytest

transformers = pytest.importorskip("transformers")

import hf_oracle as oracle  # noqa: E402

from moekit.accounting import account, kv_cache_bytes_per_token, kv_cache_window_bytes  # noqa: E402
from moekit.layers.kv_cache import KVCache, SlidingKVCache  # noqa: E402

COMMON = dict(hidden_size=36, num_attention_heads=6, max_position_embeddings=64)
YARN = {
    "rope_type": "yarn", "factor": 4.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
    "original_max_position_embeddings": 16, "rope_theta": 5000.0,
}  # fmt: skip
CASES = {
    "gpt_oss": dict(
        model_type="gpt_oss", num_hidden_layers=3, num_key_value_heads=2, head_dim=6, intermediate_size=14,
        num_local_experts=5, num_experts_per_tok=2, sliding_window=5, swiglu_limit=0.6, rope_parameters=YARN,
    ),
    # Explicit layer types (the last layer slides), another alpha, tied embeddings, plain rope.
    "gpt_oss_layer_types": dict(
        model_type="gpt_oss", num_hidden_layers=3, num_key_value_heads=3, head_dim=8, intermediate_size=10,
        num_local_experts=4, num_experts_per_tok=3, sliding_window=7, swiglu_alpha=1.3, swiglu_limit=0.8,
        layer_types=["full_attention", "full_attention", "sliding_attention"], tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 3000.0},
    ),
}  # fmt: skip


pair = oracle.pair_fixture(CASES, COMMON)


class TestAgainstTransformers(oracle.ParityChecks):
    """Logits, cached decoding, greedy and left-padded generation, written folders, quantised refusals, config."""


def test_sliding_layers_cache_only_the_window(pair):
    """Sliding layers get a ring of ``window`` slots; accounting counts them apart from per-token bytes."""
    _, model, _ = pair
    cfg = model.config
    cache = model.new_cache(1, 60)
    for i, layer in enumerate(cache.layers):
        sliding = cfg.attention.is_sliding(i)
        assert isinstance(layer, SlidingKVCache if sliding else KVCache)
        if sliding:
            assert layer.k_BGWd.shape[2] == cfg.attention.sliding_window
    assert cache.bytes_per_token == kv_cache_bytes_per_token(cfg, "fp32")
    assert cache.window_bytes == kv_cache_window_bytes(cfg, "fp32") > 0
    report = account(cfg, kv_dtype="fp32")
    assert f"cache only their last {cfg.attention.sliding_window} tokens" in report.formula
    assert report.to_dict()["kv_cache_window_bytes"] == cache.window_bytes
