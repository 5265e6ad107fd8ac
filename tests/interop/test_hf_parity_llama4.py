"""Llama 4 (``llama4_text``) against transformers (see ``hf_oracle`` for the checks).

Every option on, odd sizes: interleaved MoE layers with a shared expert, sigmoid top-k routing
applied to the experts' input (top-2, so the input scaling is not a top-1 special case), NoPE
layers with attention temperature tuning (a floor of 4 slots, so it varies inside 24-40 tokens),
chunked attention of 5 slots on the rotary layers, L2 q/k norm, biases and llama3 rope scaling.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import hf_oracle as oracle  # noqa: E402

from moekit.config import AttentionConfig, MoEConfig  # noqa: E402
from moekit.layers.attention import Attention, chunk_mask  # noqa: E402
from moekit.layers.moe import MoE  # noqa: E402

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


def test_config_round_trip(pair):
    oracle.check_config_round_trip(pair[1])


def test_layer_roles_as_transformers_assigns_them(pair):
    hf, model, _ = pair
    att = model.config.attention
    for i, layer in enumerate(hf.model.layers):
        assert layer.self_attn.use_rope == att.uses_rope(i)
        assert layer.is_moe_layer == model.config.is_moe_layer(i)
        assert (hf.config.layer_types[i] == "chunked_attention") == att.is_chunked(i)


def test_scaling_the_expert_input_is_not_scaling_its_output():
    """With the gate weight on the input, a token's output is expert(w x), checked by hand."""
    cfg = MoEConfig(n_routed_experts=3, top_k=1, expert_ffn_dim=8, score_func="sigmoid", norm_topk_prob=False)
    moe = MoE(MoEConfig(**{**cfg.__dict__, "scale_expert_input": True}), 6, impl="loop")
    x = torch.randn(5, 6)
    with torch.no_grad():
        y, routing = moe(x)
        ref = MoE(MoEConfig(**{**cfg.__dict__, "scale_expert_input": True}), 6, impl="reference")
        ref.load_state_dict(moe.state_dict())
        torch.testing.assert_close(ref(x)[0], y)
        ex = moe.experts
        for t in range(5):
            e, w = routing.idx_TK[t, 0].item(), routing.weights_TK[t, 0]
            h = w * x[t]
            want = (torch.nn.functional.silu(ex.w1[e] @ h) * (ex.w3[e] @ h)) @ ex.w2[e].T
            torch.testing.assert_close(y[t], want)


def test_chunk_mask_and_nope_temperature_hand_worked():
    # 7 slots, chunks of 3: slot 4 sees 3-4, slot 6 sees only itself.
    m = chunk_mask(None, 7, 7, 3, torch.device("cpu"))
    assert m[4].tolist() == [False, False, False, True, True, False, False]
    assert m[6].tolist() == [False] * 6 + [True]
    # A NoPE layer with temperature tuning scales query slot p by 1 + s * log(1 + floor((p + 1) / f)).
    cfg = AttentionConfig(
        n_heads=1, n_kv_heads=1, head_dim=4, temperature_tuning=True, temperature_floor=2, temperature_scale=0.5
    )
    att = Attention(cfg, 4, 1e-6, use_rope=False)
    seen = {}
    orig = torch.nn.functional.scaled_dot_product_attention

    def spy(q, *args, **kw):
        seen["q"] = q
        return orig(q, *args, **kw)

    x = torch.randn(1, 4, 4)
    torch.nn.functional.scaled_dot_product_attention = spy
    try:
        att(x, torch.arange(4))
    finally:
        torch.nn.functional.scaled_dot_product_attention = orig
    q = att.q_proj(x).view(1, 4, 1, 4).transpose(1, 2)
    floors = torch.tensor([0.0, 1.0, 1.0, 2.0])  # floor((p + 1) / 2) for p = 0..3
    factor = 1 + 0.5 * torch.log1p(floors)
    torch.testing.assert_close(seen["q"], q * factor[:, None])
