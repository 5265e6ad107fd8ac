"""Llama 4 (``llama4_text``) against transformers (see ``hf_oracle`` for the checks).

Every option on, odd sizes: interleaved MoE layers with a shared expert, sigmoid top-k routing
applied to the experts' input (top-2, so the input scaling is not a top-1 special case), NoPE
layers with attention temperature tuning (a floor of 4 slots, so it varies inside 24-40 tokens),
chunked attention of 5 slots on the rotary layers, L2 q/k norm, biases and llama3 rope scaling.
"""

from __future__ import annotations

import pytest

transformers = pytest.importorskip("transformers")

import hf_oracle as oracle  # noqa: E402

COMMON = dict(hidden_size=36, num_attention_heads=6, max_position_embeddings=64)
LLAMA3 = {
    "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16, "rope_theta": 5000.0,
}  # fmt: skip
CASES = {
    "llama4_text": dict(
        model_type="llama4_text", num_hidden_layers=4, num_key_value_heads=2, head_dim=8, intermediate_size=14,
        intermediate_size_mlp=22, num_local_experts=5, num_experts_per_tok=2, interleave_moe_layer_step=2,
        no_rope_layer_interval=2, attention_chunk_size=5, attn_temperature_tuning=True, floor_scale=4,
        attn_scale=0.3, use_qk_norm=True, attention_bias=True, rope_parameters=LLAMA3,
    ),
    # Explicit MoE layers and NoPE flags, no chunking, no q/k norm, top-1, tied embeddings.
    "llama4_text_explicit": dict(
        model_type="llama4_text", num_hidden_layers=3, num_key_value_heads=3, head_dim=10, intermediate_size=12,
        intermediate_size_mlp=20, num_local_experts=4, num_experts_per_tok=1, moe_layers=[0, 2],
        no_rope_layers=[1, 0, 1], attention_chunk_size=None, floor_scale=3, use_qk_norm=False,
        tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 3000.0},
    ),
}  # fmt: skip


pair = oracle.pair_fixture(CASES, COMMON)


class TestAgainstTransformers(oracle.ParityChecks):
    """Logits, cached decoding, greedy and left-padded generation, written folders, quantised refusals, config."""


def test_layer_roles_as_transformers_assigns_them(pair):
    hf, model, _ = pair
    att = model.config.attention
    for i, layer in enumerate(hf.model.layers):
        assert layer.self_attn.use_rope == att.uses_rope(i)
        assert layer.is_moe_layer == model.config.is_moe_layer(i)
        assert (hf.config.layer_types[i] == "chunked_attention") == att.is_chunked(i)
