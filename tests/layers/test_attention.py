"""Attention layers against hand-written references: sinks, l2 q/k norm, the KV cache, absorbed MLA.

References are written out the slow way in float64 (explicit softmax over explicit masks); the
cache tests check that attending new tokens against cached ones gives exactly what a full pass
over the whole sequence gives.
"""

from __future__ import annotations

import pytest
import torch

from moekit.config import AttentionConfig
from moekit.layers.attention import Attention, LatentAttention, causal_attention
from moekit.layers.kv_cache import KVCache, LatentCache, padded_causal_mask
from moekit.layers.rope import apply_rope

MLA = dict(kind="mla", q_lora_rank=12, kv_lora_rank=10, qk_nope_head_dim=6, qk_rope_head_dim=4, v_head_dim=8)
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8, "mscale": 1.0, "mscale_all_dim": 1.0}
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 8}
GQA_CASES = {
    "plain": dict(n_heads=4, n_kv_heads=2),
    "sinks": dict(n_heads=4, n_kv_heads=2, sinks=True, qkv_bias=True, o_bias=True),
    "l2_llama3": dict(n_heads=4, n_kv_heads=1, qk_norm="l2", rope_scaling=LLAMA3),
    "head_norm": dict(n_heads=3, n_kv_heads=3, head_dim=10, qk_norm="head"),
    "full_norm_yarn": dict(n_heads=4, n_kv_heads=4, qk_norm="full", rope_scaling=YARN),
    "partial_rotary_full_norm": dict(n_heads=4, n_kv_heads=2, qk_norm="full", partial_rotary_factor=0.5),
    "head_norm_after_rope": dict(n_heads=4, n_kv_heads=1, qk_norm="head", qk_norm_after_rope=True),
}


def reference_attention(q_BHTd, k_BGLd, v_BGLd, scale, sinks_H=None, mask_BTL=None):
    """Per head and query: softmax over the allowed keys (plus the sink logit), weighted values."""
    b, h, t, _ = q_BHTd.shape
    g, n = k_BGLd.shape[1], k_BGLd.shape[2]
    out = torch.zeros(b, h, t, v_BGLd.shape[-1], dtype=torch.float64)
    for bi in range(b):
        for hi in range(h):
            gi = hi // (h // g)
            for ti in range(t):
                allowed = [j for j in range(n) if (j <= n - t + ti if mask_BTL is None else mask_BTL[bi, ti, j])]
                s = torch.stack([q_BHTd[bi, hi, ti] @ k_BGLd[bi, gi, j] * scale for j in allowed])
                logits = s if sinks_H is None else torch.cat([s, sinks_H[hi].view(1).double()])
                p = logits.softmax(0)[: len(allowed)]
                out[bi, hi, ti] = sum(p[i] * v_BGLd[bi, gi, j] for i, j in enumerate(allowed))
    return out


def randomize(module: torch.nn.Module, std: float = 0.3) -> torch.nn.Module:
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(torch.rand_like(p) + 0.5 if name.endswith("norm.weight") else torch.randn_like(p) * std)
    return module


@pytest.mark.parametrize("sinks", [False, True])
@pytest.mark.parametrize("t,n", [(5, 5), (1, 6), (3, 7)])
def test_causal_attention_matches_reference(sinks, t, n):
    """GQA, end-aligned causal masks (prefill, decode, a chunk after a cache) and sinks."""
    q, k, v = torch.randn(2, 4, t, 8).double(), torch.randn(2, 2, n, 8).double(), torch.randn(2, 2, n, 6).double()
    sinks_H = torch.randn(4).double() if sinks else None
    got = causal_attention(q, k, v, 0.3, sinks_H)
    torch.testing.assert_close(got, reference_attention(q, k, v, 0.3, sinks_H), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("sinks", [False, True])
def test_padding_mask_matches_reference(sinks):
    valid_BL = torch.tensor([[False, False, True, True, True, True], [True] * 6])
    mask = padded_causal_mask(valid_BL, 4)
    q, k, v = torch.randn(2, 2, 4, 8).double(), torch.randn(2, 1, 6, 8).double(), torch.randn(2, 1, 6, 8).double()
    sinks_H = torch.randn(2).double() if sinks else None
    got = causal_attention(q, k, v, 0.5, sinks_H, mask)
    want = reference_attention(q, k, v, 0.5, sinks_H, mask[:, 0])
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # Real queries never see padding; the padding query (row 0, slot 2 is real, slots 0-1 are not) sees itself.
    assert not mask[0, 0, :, :2].any() and mask[0, 0, 0].tolist() == [False, False, True, False, False, False]


def test_sinks_take_probability_mass():
    """A large sink logit drives the output towards zero; a very negative one changes nothing."""
    q, k, v = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4)
    plain = causal_attention(q, k, v, 0.5)
    torch.testing.assert_close(causal_attention(q, k, v, 0.5, torch.full((2,), -1e4)), plain)
    assert causal_attention(q, k, v, 0.5, torch.full((2,), 30.0)).abs().max() < 1e-6


def test_l2_qk_norm_makes_attention_scale_invariant():
    """Llama 4's parameter-free q/k norm: scaling the q and k projections changes nothing."""
    attn = randomize(Attention(AttentionConfig(**GQA_CASES["l2_llama3"], head_dim=8), 16, 1e-12)).double()
    x = torch.randn(2, 5, 16).double()
    before = attn(x, torch.arange(5))
    with torch.no_grad():
        attn.q_proj.weight.mul_(7.0)
        attn.k_proj.weight.mul_(3.0)
    torch.testing.assert_close(attn(x, torch.arange(5)), before, rtol=1e-6, atol=1e-6)
    plain = randomize(Attention(AttentionConfig(n_heads=4, n_kv_heads=1, head_dim=8), 16, 1e-6)).double()
    y = plain(x, torch.arange(5))
    with torch.no_grad():
        plain.q_proj.weight.mul_(7.0)
    assert (plain(x, torch.arange(5)) - y).abs().max() > 1e-3  # without the norm it does change


def build(case: str, d_model: int = 16) -> torch.nn.Module:
    if case == "mla":
        return randomize(LatentAttention(AttentionConfig(n_heads=3, rope_scaling=YARN, **MLA), d_model, 1e-6))
    cfg = AttentionConfig(**GQA_CASES[case])
    cfg.validate(d_model)
    return randomize(Attention(cfg, d_model, 1e-6))


def new_cache(attn: torch.nn.Module, batch: int, n: int, dtype=torch.float64):
    if isinstance(attn, LatentAttention):
        return LatentCache(batch, n, attn.kv_lora_rank, attn.rope_dim, dtype, "cpu")
    return KVCache(batch, attn.n_kv_heads, n, attn.head_dim, attn.head_dim, dtype, "cpu")


@pytest.mark.parametrize("case", [*GQA_CASES, "mla"])
def test_cached_attention_equals_full_pass(case):
    """Prefill 6, a chunk of 3, then single tokens, positions up to 13 (past yarn/llama3's original 8)."""
    attn = build(case).double()
    x = torch.randn(2, 14, 16).double()
    full = attn(x, torch.arange(14))
    cache = new_cache(attn, 2, 14)
    parts, offset = [], 0
    for size in (6, 3, 1, 1, 1, 1, 1):
        parts.append(attn(x[:, offset : offset + size], torch.arange(offset, offset + size), cache, offset))
        offset += size
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-10, atol=1e-10)


def test_absorbed_latent_attention_equals_expanded():
    """W_UK folded into the query and W_UV applied after attention == up-projecting every latent."""
    attn = build("mla").double()
    x = torch.randn(2, 9, 16).double()
    results = {}
    for path in ("absorbed", "expanded"):
        attn.path = path
        cache = new_cache(attn, 2, 9)
        prefill = attn(x[:, :5], torch.arange(5), cache, 0)
        steps = [attn(x[:, i : i + 1], torch.arange(i, i + 1), cache, i) for i in range(5, 9)]
        no_cache = attn(x, torch.arange(9))
        results[path] = (torch.cat([prefill, *steps], dim=1), no_cache)
    attn.path = "auto"
    torch.testing.assert_close(results["absorbed"][0], results["expanded"][0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(results["absorbed"][1], results["expanded"][1], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(results["absorbed"][0], results["expanded"][1], rtol=1e-12, atol=1e-12)


def test_latent_cache_holds_only_the_compressed_rows():
    """kv_lora_rank + qk_rope_head_dim values per token: the normalised latent, then the roped key."""
    attn = build("mla").double()
    cache = new_cache(attn, 1, 4)
    x = torch.randn(1, 4, 16).double()
    attn(x, torch.arange(4), cache, 0)
    assert cache.values_per_token == 10 + 4
    latent = attn.kv_a_layernorm(attn.kv_a_proj_with_mqa(x)[..., :10])
    torch.testing.assert_close(cache.kv_BSX[..., :10], latent)


def test_softmax_scale_replaces_one_over_sqrt_head_dim():
    """Granite's attention_multiplier: scale s is the default scale with q multiplied by s * sqrt(d)."""
    torch.manual_seed(0)
    cfg = AttentionConfig(n_heads=4, n_kv_heads=2, qkv_bias=True, softmax_scale=0.9)
    cfg.validate(16)
    scaled = randomize(Attention(cfg, 16, 1e-6)).double()
    plain_cfg = AttentionConfig(n_heads=4, n_kv_heads=2, qkv_bias=True)
    plain_cfg.validate(16)
    plain = Attention(plain_cfg, 16, 1e-6).double()
    plain.load_state_dict(scaled.state_dict())
    with torch.no_grad():
        plain.q_proj.weight.mul_(0.9 * 4**0.5)
        plain.q_proj.bias.mul_(0.9 * 4**0.5)
    x = torch.randn(2, 5, 16).double()
    torch.testing.assert_close(scaled(x, torch.arange(5)), plain(x, torch.arange(5)), rtol=1e-12, atol=1e-12)
    assert (scaled(x, torch.arange(5)) - Attention(plain_cfg, 16, 1e-6).double()(x, torch.arange(5))).abs().max() > 0


def test_clip_qkv_clamps_the_projections_before_rotary():
    """DBRX's clip_qkv: the same as the unclipped layer with its q/k/v outputs clamped (hooks)."""
    torch.manual_seed(0)
    cfg = AttentionConfig(n_heads=4, n_kv_heads=2, clip_qkv=0.5)
    cfg.validate(16)
    clipped = randomize(Attention(cfg, 16, 1e-6), std=0.5).double()
    plain_cfg = AttentionConfig(n_heads=4, n_kv_heads=2)
    plain_cfg.validate(16)
    plain = Attention(plain_cfg, 16, 1e-6).double()
    plain.load_state_dict(clipped.state_dict())
    x = torch.randn(2, 6, 16).double()
    unclamped = plain(x, torch.arange(6))
    for proj in (plain.q_proj, plain.k_proj, plain.v_proj):
        proj.register_forward_hook(lambda _m, _i, out: out.clamp(-0.5, 0.5))
    torch.testing.assert_close(clipped(x, torch.arange(6)), plain(x, torch.arange(6)), rtol=1e-12, atol=1e-12)
    assert (clipped(x, torch.arange(6)) - unclamped).abs().max() > 1e-3  # the clamp bites


def test_head_qk_norm_after_rope_matches_reference():
    """Hunyuan-MoE: RMSNorm(head_dim) with its weight applied to the rotated q and k."""
    torch.manual_seed(0)
    cfg = AttentionConfig(n_heads=4, n_kv_heads=2, qk_norm="head", qk_norm_after_rope=True, rope_theta=100.0)
    cfg.validate(16)
    attn = randomize(Attention(cfg, 16, 1e-6)).double()
    x, pos = torch.randn(1, 5, 16).double(), torch.arange(5)
    q = attn.q_proj(x).view(1, 5, 4, 4).transpose(1, 2)
    k = attn.k_proj(x).view(1, 5, 2, 4).transpose(1, 2)
    v = attn.v_proj(x).view(1, 5, 2, 4).transpose(1, 2)
    cos, sin = attn.rope(pos)
    q, k = apply_rope(q, cos.double(), sin.double()), apply_rope(k, cos.double(), sin.double())

    def rms(t, w):
        return w * t / (t.pow(2).mean(-1, keepdim=True) + 1e-6).sqrt()

    q, k = rms(q, attn.q_norm.weight), rms(k, attn.k_norm.weight)
    ref = attn.o_proj(reference_attention(q, k, v, 0.5).transpose(1, 2).reshape(1, 5, 16))
    torch.testing.assert_close(attn(x, pos), ref, rtol=1e-10, atol=1e-10)
    before = Attention(AttentionConfig(n_heads=4, n_kv_heads=2, head_dim=4, qk_norm="head", rope_theta=100.0), 16, 1e-6)
    before.load_state_dict(attn.state_dict())
    assert (before.double()(x, pos) - ref).abs().max() > 1e-6  # the order matters


def test_partial_rotary_rotates_only_the_first_dims():
    """MiniMax-M2: rotary of width int(head_dim * factor) on the first dims; the rest pass through."""
    torch.manual_seed(0)
    cfg = AttentionConfig(n_heads=2, n_kv_heads=1, head_dim=8, partial_rotary_factor=0.5, rope_theta=100.0)
    cfg.validate(12)
    attn = randomize(Attention(cfg, 12, 1e-6)).double()
    assert attn.rope.dim == 4
    x, pos = torch.randn(1, 6, 12).double(), torch.arange(6)
    q = attn.q_proj(x).view(1, 6, 2, 8).transpose(1, 2)
    k = attn.k_proj(x).view(1, 6, 1, 8).transpose(1, 2)
    v = attn.v_proj(x).view(1, 6, 1, 8).transpose(1, 2)
    cos, sin = attn.rope(pos)

    def rotate(t):
        return torch.cat([apply_rope(t[..., :4], cos.double(), sin.double()), t[..., 4:]], dim=-1)

    ref = attn.o_proj(reference_attention(rotate(q), rotate(k), v, 8**-0.5).transpose(1, 2).reshape(1, 6, 16))
    torch.testing.assert_close(attn(x, pos), ref, rtol=1e-10, atol=1e-10)
