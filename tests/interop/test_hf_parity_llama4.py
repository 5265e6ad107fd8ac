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


@pytest.fixture(scope="module", params=sorted(CASES))
def pair(request, tmp_path_factory):
    kw = dict(CASES[request.param])
    hf = oracle.build_hf(transformers, kw.pop("model_type"), **COMMON, **kw)
    folder = tmp_path_factory.mktemp(request.param)
    return hf, oracle.save_and_load(hf, folder), folder


def test_logits_match_transformers(pair):
    hf, model, _ = pair
    oracle.check_logits(hf, model)


def test_cached_decoding_equals_full_forward(pair):
    oracle.check_cached_equals_full(pair[1])


def test_greedy_generation_matches_transformers(pair):
    hf, model, _ = pair
    oracle.check_greedy(hf, model)


def test_left_padded_batch_matches_transformers(pair):
    hf, model, _ = pair
    oracle.check_left_padded_batch(hf, model)


def test_moekit_written_hf_folder_loads_in_transformers(pair, tmp_path):
    hf, model, folder = pair
    oracle.check_written_folder(transformers, hf, model, folder, tmp_path / "out")


@pytest.mark.parametrize("quant", oracle.QUANTIZATIONS, ids=["fp8", "mxfp4"])
def test_quantized_checkpoints_are_refused_naming_the_quantization(pair, quant, tmp_path):
    oracle.check_quantized_refused(pair[2], tmp_path, quant)


def test_config_round_trip(pair):
    oracle.check_config_round_trip(pair[1])


def test_layer_roles_as_transformers_assigns_them(pair):
    hf, model, _ = pair
    att = model.config.attention
    for i, layer in enumerate(hf.model.layers):
        assert layer.self_attn.use_rope == att.uses_rope(i)
        assert layer.is_moe_layer == model.config.is_moe_layer(i)
        assert (hf.config.layer_types[i] == "chunked_attention") == att.is_chunked(i)
