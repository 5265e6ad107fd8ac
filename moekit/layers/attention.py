"""Causal self-attention: grouped-query attention and DeepSeek's multi-head latent attention.

Both take the new tokens ``x``, their rotary ``positions`` and optionally a layer cache
(``moekit.layers.kv_cache``) with the ``offset`` of the new tokens in it, and an attention
``mask``. Without a mask, attention is causal aligned at the end: query i of T attends to keys up
to ``L - T + i`` of L (equal lengths: plain causal; one query: every key).

Shapes: B batch, T new tokens, L keys (cached + new), D model width, H query heads, G key/value
heads, d head width, v value head width, C latent (compressed kv) width, R rotary width, X = C + R
(one row of the latent cache), N nope (non-rotary) query/key width. Projections use Hugging
Face's names so that checkpoint mapping stays a rename.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.config import AttentionConfig
from moekit.layers.kv_cache import KVCache, LatentCache
from moekit.layers.rope import RotaryEmbedding, apply_rope, yarn_mscale


def end_aligned_causal_mask(t: int, n: int, device: torch.device) -> Tensor:
    """``[T, L]`` bool: query i (the (L - T + i)-th token) attends to keys 0 .. L - T + i."""
    return torch.arange(n, device=device)[None, :] <= torch.arange(n - t, n, device=device)[:, None]


def causal_attention(
    q_BHTd: Tensor,
    k_BGLd: Tensor,
    v_BGLd: Tensor,
    scale: float,
    sinks_H: Tensor | None = None,
    mask: Tensor | None = None,
) -> Tensor:
    """Softmax attention; GQA heads share k/v. Returns ``[B, H, T, dv]``.

    ``mask`` (bool, True = may attend, broadcast to ``[B, H, T, L]``) replaces the default
    end-aligned causal mask.
    """
    t, n = q_BHTd.shape[2], k_BGLd.shape[2]
    if sinks_H is None:
        enable_gqa = q_BHTd.shape[1] != k_BGLd.shape[1]
        # NOTE: no mask tensor in the two common cases (prefill: T == L; decode: T == 1), so SDPA
        # can pick its fused kernels.
        is_causal = mask is None and t == n and t > 1
        if mask is None and t != n and t > 1:
            mask = end_aligned_causal_mask(t, n, q_BHTd.device)
        return F.scaled_dot_product_attention(
            q_BHTd, k_BGLd, v_BGLd, attn_mask=mask, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa
        )
    # Attention sinks (gpt-oss): a per-head logit joins every softmax and takes mass, no value.
    rep = q_BHTd.shape[1] // k_BGLd.shape[1]
    k_BHLd = k_BGLd.repeat_interleave(rep, dim=1)
    v_BHLd = v_BGLd.repeat_interleave(rep, dim=1)
    scores_BHTL = (q_BHTd @ k_BHLd.transpose(-1, -2)) * scale
    if mask is None:
        mask = end_aligned_causal_mask(t, n, q_BHTd.device)
    scores_BHTL = scores_BHTL.masked_fill(~mask, float("-inf"))
    sink_BHT1 = sinks_H.to(scores_BHTL.dtype).view(1, -1, 1, 1).expand(*scores_BHTL.shape[:3], 1)
    probs = torch.cat([scores_BHTL, sink_BHT1], dim=-1).softmax(dim=-1)[..., :-1]
    return probs @ v_BHLd


def window_mask(mask: Tensor | None, t: int, end: int, n: int, window: int, device: torch.device) -> Tensor:
    """The mask of a sliding-window layer over its ``n`` keys, slots ``end - n .. end - 1``, for the
    ``t`` queries in slots ``end - t ..``: ``mask`` (``[B, 1, T, L]`` over all ``end`` slots, or
    None: causal) restricted to those keys and to keys less than ``window`` slots back."""
    q_T1 = torch.arange(end - t, end, device=device)[:, None]
    k_1N = torch.arange(end - n, end, device=device)[None, :]
    band_TN = (k_1N <= q_T1) & (k_1N > q_T1 - window)
    return band_TN if mask is None else mask[..., end - n :] & band_TN


def chunk_mask(mask: Tensor | None, t: int, end: int, chunk: int, device: torch.device) -> Tensor:
    """The mask of a chunked-attention layer for ``t`` queries in slots ``end - t ..`` over all ``end``
    slots: causal (or ``mask``) and inside the query's chunk. Chunks count from each row's first
    real slot, as transformers does for left padding (the first slot the last query may see)."""
    q_T1 = torch.arange(end - t, end, device=device)[:, None]
    k_1L = torch.arange(end, device=device)[None, :]
    if mask is None:
        return (k_1L <= q_T1) & (k_1L // chunk == q_T1 // chunk)
    start_B111 = mask[:, :, -1, :].to(torch.int64).argmax(dim=-1)[:, :, None, None]
    return mask & ((k_1L - start_B111) // chunk == (q_T1 - start_B111) // chunk)


class Attention(nn.Module):
    """Grouped-query attention with optional q/k norm, biases, attention sinks and q/k/v clamping."""

    def __init__(
        self,
        cfg: AttentionConfig,
        d_model: int,
        norm_eps: float,
        rope: RotaryEmbedding | None = None,
        window: int | None = None,
        chunk: int | None = None,
        use_rope: bool = True,
    ):
        super().__init__()
        assert cfg.head_dim is not None and cfg.n_kv_heads is not None
        self.window = window  # sliding window: a query sees itself and window - 1 slots before it
        self.chunk = chunk  # chunked attention: a query sees the earlier slots of its chunk
        self.use_rope = use_rope  # False: a NoPE layer (no rotary, no l2 q/k norm, temperature tuning)
        self.temperature = (cfg.temperature_floor, cfg.temperature_scale) if cfg.temperature_tuning else None
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.qk_norm = cfg.qk_norm
        self.qk_norm_after_rope = cfg.qk_norm_after_rope
        q_width, kv_width = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
        self.q_proj = nn.Linear(d_model, q_width, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(d_model, kv_width, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(d_model, kv_width, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(q_width, d_model, bias=cfg.o_bias)
        if cfg.qk_norm == "head":  # Qwen3-MoE: one RMSNorm(head_dim) shared by all heads
            self.q_norm, self.k_norm = nn.RMSNorm(cfg.head_dim, eps=norm_eps), nn.RMSNorm(cfg.head_dim, eps=norm_eps)
        elif cfg.qk_norm == "full":  # OLMoE: RMSNorm over the whole projection
            self.q_norm, self.k_norm = nn.RMSNorm(q_width, eps=norm_eps), nn.RMSNorm(kv_width, eps=norm_eps)
        self.norm_eps = norm_eps
        self.sinks = nn.Parameter(torch.zeros(cfg.n_heads)) if cfg.sinks else None
        self.rope = rope or RotaryEmbedding(cfg.rotary_dim, cfg.rope_theta, cfg.rope_scaling)
        # < head_dim: partial rotary (GLM-4.5), the rest passes through; 2 * ceil(r / 2) as in transformers
        self.rotary_width = 2 * ((cfg.rotary_dim + 1) // 2)
        self.interleaved = cfg.rope_interleave
        self.scale = cfg.softmax_scale if cfg.softmax_scale is not None else 1.0 / math.sqrt(cfg.head_dim)
        self.clip_qkv = cfg.clip_qkv

    def forward(
        self,
        x_BTD: Tensor,
        positions_T: Tensor,
        cache: KVCache | None = None,
        offset: int = 0,
        mask: Tensor | None = None,
    ) -> Tensor:
        """``positions_T``: ``[T]`` or ``[B, T]``; ``cache``: this layer's, new tokens stored at ``offset``."""
        b, t, _ = x_BTD.shape
        q, k, v = self.q_proj(x_BTD), self.k_proj(x_BTD), self.v_proj(x_BTD)
        if self.clip_qkv is not None:  # DBRX
            q, k, v = (p.clamp(-self.clip_qkv, self.clip_qkv) for p in (q, k, v))
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        q_BTHd = q.view(b, t, self.n_heads, self.head_dim)
        k_BTGd = k.view(b, t, self.n_kv_heads, self.head_dim)
        if self.qk_norm == "head" and not self.qk_norm_after_rope:
            q_BTHd, k_BTGd = self.q_norm(q_BTHd), self.k_norm(k_BTGd)
        q_BHTd, k_BGTd = q_BTHd.transpose(1, 2), k_BTGd.transpose(1, 2)
        v_BGTd = v.view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.use_rope:
            cos, sin = self.rope(positions_T)
            q_BHTd = self._rotate(q_BHTd, cos, sin)
            k_BGTd = self._rotate(k_BGTd, cos, sin)
            if self.qk_norm == "l2":  # Llama 4: parameter-free RMS normalisation after rotation
                q_BHTd, k_BGTd = (
                    F.rms_norm(q_BHTd, (self.head_dim,), eps=self.norm_eps),
                    F.rms_norm(k_BGTd, (self.head_dim,), eps=self.norm_eps),
                )
        elif self.temperature is not None:  # Llama 4 NoPE layers: sharper attention far into the context
            floor, scale = self.temperature
            slots_T = torch.arange(offset, offset + t, device=x_BTD.device, dtype=torch.float32)
            q_BHTd = q_BHTd * (torch.log1p(torch.floor((slots_T + 1) / floor)) * scale + 1).to(q_BHTd.dtype)[:, None]
        if self.qk_norm_after_rope:  # Hunyuan-MoE: the per-head norms see rotated q/k
            q_BHTd, k_BGTd = self.q_norm(q_BHTd), self.k_norm(k_BGTd)
        # L keys after the cache update (a window's worth if the layer slides)
        k_BGLd, v_BGLd = (k_BGTd, v_BGTd) if cache is None else cache.update(k_BGTd, v_BGTd, offset)
        if self.window is not None:
            mask = window_mask(mask, t, offset + t, k_BGLd.shape[2], self.window, x_BTD.device)
        if self.chunk is not None:
            mask = chunk_mask(mask, t, offset + t, self.chunk, x_BTD.device)
        out_BHTd = causal_attention(q_BHTd, k_BGLd, v_BGLd, self.scale, self.sinks, mask)
        return self.o_proj(out_BHTd.transpose(1, 2).reshape(b, t, -1))

    def _rotate(self, x_BHTd: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        r = self.rotary_width
        if r == self.head_dim:
            return apply_rope(x_BHTd, cos, sin, self.interleaved)
        return torch.cat([apply_rope(x_BHTd[..., :r], cos, sin, self.interleaved), x_BHTd[..., r:]], dim=-1)


# The latent norms use RMSNorm's default eps whatever the model's norm_eps, as DeepSeek's reference
# code and transformers do (it matters for checkpoints with rms_norm_eps != 1e-6, e.g. 1e-5).
LATENT_NORM_EPS = 1e-6


class LatentAttention(nn.Module):
    """Multi-head latent attention (DeepSeek-V2/V3): low-rank q and a compressed, shared kv latent.

    Each head's query/key is a "nope" part (from the latent) and a rotary part; the key's rotary
    part is one vector shared by all heads (``kv_a_proj_with_mqa``).
    """

    def __init__(self, cfg: AttentionConfig, d_model: int, norm_eps: float, rope: RotaryEmbedding | None = None):
        super().__init__()
        h = cfg.n_heads
        self.n_heads = h
        self.nope, self.rope_dim, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.kv_lora_rank = cfg.kv_lora_rank
        qk_dim = self.nope + self.rope_dim
        self.q_lora = cfg.q_lora_rank is not None
        if cfg.q_lora_rank is None:
            self.q_proj = nn.Linear(d_model, h * qk_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(d_model, cfg.q_lora_rank, bias=cfg.mla_bias)
            self.q_a_layernorm = nn.RMSNorm(cfg.q_lora_rank, eps=LATENT_NORM_EPS)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, h * qk_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(d_model, cfg.kv_lora_rank + self.rope_dim, bias=cfg.mla_bias)
        self.kv_a_layernorm = nn.RMSNorm(cfg.kv_lora_rank, eps=LATENT_NORM_EPS)
        self.kv_b_proj = nn.Linear(cfg.kv_lora_rank, h * (self.nope + self.v_dim), bias=False)
        self.o_proj = nn.Linear(h * self.v_dim, d_model, bias=cfg.mla_bias)
        self.rope = rope or RotaryEmbedding(self.rope_dim, cfg.rope_theta, cfg.rope_scaling)
        self.interleaved = cfg.rope_interleave
        self.scale = 1.0 / math.sqrt(qk_dim)
        scaling = cfg.rope_scaling or {}
        if scaling.get("mscale_all_dim"):  # YaRN also sharpens the softmax (DeepSeek-V2 paper)
            self.scale *= yarn_mscale(float(scaling["factor"]), float(scaling["mscale_all_dim"])) ** 2
        # "auto": absorbed when attending to cached tokens (decode), expanded otherwise (prefill,
        # training); "absorbed" / "expanded" force one path (tests check they agree).
        self.path: str = "auto"

    def forward(
        self,
        x_BTD: Tensor,
        positions_T: Tensor,
        cache: LatentCache | None = None,
        offset: int = 0,
        mask: Tensor | None = None,
    ) -> Tensor:
        """``positions_T``: ``[T]`` or ``[B, T]``; ``cache``: this layer's, new tokens stored at ``offset``."""
        b, t, _ = x_BTD.shape
        h = self.n_heads
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x_BTD))) if self.q_lora else self.q_proj(x_BTD)
        q_nope, q_rot = q.view(b, t, h, -1).transpose(1, 2).split([self.nope, self.rope_dim], dim=-1)
        latent_BTC, k_rot_BTR = self.kv_a_proj_with_mqa(x_BTD).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        latent_BTC = self.kv_a_layernorm(latent_BTC)
        cos, sin = self.rope(positions_T)
        q_rot = apply_rope(q_rot, cos, sin, self.interleaved)
        k_rot_BTR = apply_rope(k_rot_BTR.unsqueeze(1), cos, sin, self.interleaved).squeeze(1)
        if cache is not None:  # the compressed cache: latent and roped key rows of all L tokens
            kv_BLX = cache.update(latent_BTC, k_rot_BTR, offset)
            latent_BLC, k_rot_BLR = kv_BLX.split([self.kv_lora_rank, self.rope_dim], dim=-1)
        else:
            kv_BLX, latent_BLC, k_rot_BLR = None, latent_BTC, k_rot_BTR
        absorbed = self.path == "absorbed" or (self.path == "auto" and offset > 0)
        if absorbed:
            out_BHTv = self._absorbed(q_nope, q_rot, latent_BLC, k_rot_BLR, kv_BLX, mask)
        else:
            out_BHTv = self._expanded(q_nope, q_rot, latent_BLC, k_rot_BLR, mask)
        return self.o_proj(out_BHTv.transpose(1, 2).reshape(b, t, -1))

    def _expanded(self, q_nope: Tensor, q_rot: Tensor, latent_BLC: Tensor, k_rot_BLR: Tensor, mask: Tensor | None):
        """Up-project the latent into every head's key and value, then attend (H heads of width nope + R)."""
        b, n, h = latent_BLC.shape[0], latent_BLC.shape[1], self.n_heads
        kv = self.kv_b_proj(latent_BLC).view(b, n, h, -1).transpose(1, 2)
        k_nope, v_BHLv = kv.split([self.nope, self.v_dim], dim=-1)
        q_BHTd = torch.cat([q_nope, q_rot], dim=-1)
        k_BHLd = torch.cat([k_nope, k_rot_BLR.unsqueeze(1).expand(b, h, n, self.rope_dim)], dim=-1)
        return causal_attention(q_BHTd, k_BHLd, v_BHLv, self.scale, None, mask)

    def _absorbed(
        self,
        q_nope: Tensor,
        q_rot: Tensor,
        latent_BLC: Tensor,
        k_rot_BLR: Tensor,
        kv_BLX: Tensor | None,
        mask: Tensor | None,
    ) -> Tensor:
        """Attend over the latent itself: one key/value head of width C + R shared by all heads.

        ``q_nope · (W_UK c)`` = ``(W_UK^T q_nope) · c``, so W_UK is folded into the query; the
        output is a mix of latents, mapped to each head's value by W_UV after attention.
        """
        # NOTE: decode cost per token is O(L (C + R)) per head, not O(L · H · (nope + v)) for
        # re-expanding every cached latent; the expanded path stays for prefill (T ~ L).
        # NOTE: written as three batched matmuls and a softmax over ``[B, H*T, L]`` rather than
        # SDPA: with one key head SDPA's math kernel expands the latent to every head (a copy per
        # call) and adds ~30 small ops; at batch 1 these, not the arithmetic, were the step's cost.
        b, h, t, _ = q_nope.shape
        n = latent_BLC.shape[1]
        w_HXC = self.kv_b_proj.weight.view(h, self.nope + self.v_dim, self.kv_lora_rank)
        w_uk_HNC, w_uv_HVC = w_HXC.split([self.nope, self.v_dim], dim=1)
        q_BHTX = torch.cat([torch.matmul(q_nope, w_uk_HNC), q_rot], dim=-1)
        k_BLX = kv_BLX if kv_BLX is not None else torch.cat([latent_BLC, k_rot_BLR], dim=-1)
        scores_BML = torch.bmm(q_BHTX.reshape(b, h * t, -1), k_BLX.transpose(1, 2)).mul_(self.scale)  # M = H*T
        if mask is None and t > 1:
            mask = end_aligned_causal_mask(t, n, q_nope.device)
        if mask is not None:
            scores_BML.view(b, h, t, n).masked_fill_(~mask, float("-inf"))
        out_BMC = torch.bmm(scores_BML.softmax(dim=-1), latent_BLC)
        return torch.matmul(out_BMC.view(b, h, t, -1), w_uv_HVC.transpose(1, 2))


def build_attention(
    cfg: AttentionConfig, d_model: int, norm_eps: float, rope: RotaryEmbedding | None = None, layer: int = 0
) -> nn.Module:
    """``rope``: a rotary table shared with other layers (one per model); None builds one. ``layer``
    decides whether a sliding window applies (``cfg.is_sliding``)."""
    if cfg.kind == "mla":
        return LatentAttention(cfg, d_model, norm_eps, rope)
    window = cfg.sliding_window if cfg.is_sliding(layer) else None
    chunk = cfg.chunk_size if cfg.is_chunked(layer) else None
    return Attention(cfg, d_model, norm_eps, rope, window, chunk, cfg.uses_rope(layer))


def rotary_for(cfg: AttentionConfig, max_positions: int | None = None) -> RotaryEmbedding:
    """The rotary embedding every layer of a model with this attention config uses."""
    return RotaryEmbedding(cfg.rotary_dim, cfg.rope_theta, cfg.rope_scaling, max_positions)
