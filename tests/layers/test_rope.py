"""Rotary embedding: rotation properties and scaled frequencies against transformers'."""

from __future__ import annotations

import pytest
import torch

from moekit.config import ConfigError
from moekit.layers.rope import RotaryEmbedding, apply_rope, rope_frequencies


def test_rotation_preserves_norm_and_encodes_relative_position():
    rope = RotaryEmbedding(16, 10000.0)
    q, k = torch.randn(16), torch.randn(16)
    cos, sin = rope(torch.arange(20))
    rq, rk = apply_rope(q.expand(20, 16), cos, sin), apply_rope(k.expand(20, 16), cos, sin)
    torch.testing.assert_close(rq.norm(dim=-1), q.norm().expand(20))
    # <R_m q, R_n k> depends only on m - n.
    torch.testing.assert_close(rq[5] @ rk[2], rq[15] @ rk[12], atol=1e-4, rtol=1e-4)


def test_interleaved_layout_is_a_permutation_of_halves():
    cos, sin = RotaryEmbedding(8, 100.0)(torch.arange(3))
    x = torch.randn(3, 8)
    perm = torch.tensor([0, 2, 4, 6, 1, 3, 5, 7])
    torch.testing.assert_close(apply_rope(x, cos, sin, interleaved=True), apply_rope(x[:, perm], cos, sin))


@pytest.mark.parametrize(
    "scaling",
    [
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        {
            "rope_type": "yarn",
            "factor": 40.0,
            "beta_fast": 32,
            "beta_slow": 1,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
            "original_max_position_embeddings": 4096,
        },
        {
            "rope_type": "yarn",
            "factor": 32.0,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "original_max_position_embeddings": 4096,
        },
        {"rope_type": "linear", "factor": 4.0},
    ],
)
def test_scaled_frequencies_match_transformers(scaling):
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    theta, dim = 50000.0, 64
    cfg = transformers.LlamaConfig(
        hidden_size=dim * 2,
        num_attention_heads=2,
        max_position_embeddings=163840,
        rope_parameters={**scaling, "rope_theta": theta},
    )
    ref_inv, ref_factor = ROPE_INIT_FUNCTIONS[scaling["rope_type"]](cfg, "cpu")
    inv, factor = rope_frequencies(dim, theta, scaling)
    torch.testing.assert_close(inv, ref_inv.float(), atol=1e-7, rtol=1e-5)
    assert factor == pytest.approx(ref_factor)


def test_unknown_scaling_names_the_field():
    with pytest.raises(ConfigError, match="rope_scaling"):
        rope_frequencies(8, 10000.0, {"rope_type": "dynamic-ntk-by-magic", "factor": 2.0})


def test_phimoe_longrope_matches_transformers_on_both_sides_of_the_original_length():
    """Short-factor frequencies at every length; short_mscale up to original_max_position_embeddings
    positions in a pass, long_mscale past it (transformers 5's PhimoeRotaryEmbedding)."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.phimoe.modeling_phimoe import PhimoeRotaryEmbedding

    scaling = {
        "rope_type": "longrope",
        "original_max_position_embeddings": 8,
        "short_factor": [1.0, 1.5, 2.0, 4.0],
        "long_factor": [1.0, 3.0, 7.0, 20.0],
        "short_mscale": 1.1,
        "long_mscale": 1.3,
    }
    cfg = transformers.PhimoeConfig(
        hidden_size=16,
        num_attention_heads=2,
        max_position_embeddings=64,
        rope_parameters={**scaling, "rope_theta": 500.0},
    )
    theirs, ours = PhimoeRotaryEmbedding(cfg), RotaryEmbedding(8, 500.0, scaling, 64)
    for n in (6, 8, 20):
        positions = torch.arange(n)
        cos, sin = theirs(torch.zeros(1), positions[None])
        got = ours(positions)
        torch.testing.assert_close(got[0], cos[0], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(got[1], sin[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_apply_rope_equals_the_rotate_half_formula_bit_for_bit(dtype):
    """The roll-and-signed-sin form gives exactly ``x * cos + rotate_half(x) * sin`` (any tables,
    fp32 tables cast to x's dtype), so switching to it changed no decoded token."""
    from moekit.layers.rope import rotate_half

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 5, 8, generator=g).to(dtype)
    cos, sin = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g)
    want = x * cos.to(dtype) + rotate_half(x) * sin.to(dtype)
    assert torch.equal(apply_rope(x, cos, sin), want)
    sin2 = torch.randn(5, 8, generator=g)  # a new table is not served from the memo of the last one
    assert torch.equal(apply_rope(x, cos, sin2), x * cos.to(dtype) + rotate_half(x) * sin2.to(dtype))
