"""Attention layouts the loaded model types need, against hand-worked or explicit references:
partial rotary (GLM-4.5), sliding windows with a ring cache (gpt-oss, dots.llm1), chunked attention
and NoPE temperature tuning (Llama 4)."""

from __future__ import annotations

import pytest
import torch

from moekit.config import AttentionConfig
from moekit.layers.attention import Attention, chunk_mask
from moekit.layers.kv_cache import SlidingKVCache


def test_partial_rotary_leaves_the_tail_unrotated():
    """Dims past int(head_dim * factor) are the same at every position; the rotated part is plain rope."""
    from moekit.config import AttentionConfig
    from moekit.layers.attention import Attention
    from moekit.layers.rope import RotaryEmbedding, apply_rope

    cfg = AttentionConfig(n_heads=2, n_kv_heads=1, head_dim=10, partial_rotary_factor=0.4)
    att = Attention(cfg, 12, 1e-6)
    x = torch.randn(1, 2, 5, 10)
    cos, sin = att.rope(torch.arange(5))
    y = att._rotate(x, cos, sin)
    torch.testing.assert_close(y[..., 4:], x[..., 4:])
    want = apply_rope(x[..., :4], *RotaryEmbedding(4, cfg.rope_theta)(torch.arange(5)))
    torch.testing.assert_close(y[..., :4], want)


@pytest.mark.parametrize("sinks", [False, True])
def test_sliding_window_attention_matches_a_banded_reference(sinks):
    """Full pass and chunked cached passes equal attention with an explicit window band."""
    cfg = AttentionConfig(n_heads=4, n_kv_heads=2, head_dim=8, sinks=sinks, sliding_window=3)
    torch.manual_seed(0)
    att = Attention(cfg, 16, 1e-6, window=3).double()
    with torch.no_grad():
        if sinks:
            att.sinks.normal_()
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    full_att = Attention(cfg, 16, 1e-6).double()
    full_att.load_state_dict(att.state_dict())
    q = torch.arange(9)
    band = (q[None, :] <= q[:, None]) & (q[None, :] > q[:, None] - 3)
    with torch.no_grad():
        want = full_att(x, torch.arange(9), mask=band)
        got = att(x, torch.arange(9))
        cache = SlidingKVCache(2, 2, 3, 8, 8, torch.float64, "cpu")
        parts, start = [], 0
        for size in (4, 1, 2, 1, 1):
            parts.append(att(x[:, start : start + size], torch.arange(start, start + size), cache, start))
            start += size
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(torch.cat(parts, dim=1), want)


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
