"""Causal self-attention: grouped-query attention and DeepSeek's multi-head latent attention.

Shapes: B batch, T tokens, D model width, H query heads, G key/value heads, d head width,
C latent (compressed kv) width, R rotary width. Projections use Hugging Face's names so that
checkpoint mapping stays a rename.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.config import AttentionConfig
from moekit.layers.rope import RotaryEmbedding, apply_rope


def causal_attention(q_BHTd: Tensor, k_BGTd: Tensor, v_BGTd: Tensor, scale: float, sinks_H: Tensor | None) -> Tensor:
    """Softmax attention with a causal mask; GQA heads share k/v. Returns ``[B, H, T, dv]``."""
    if sinks_H is None:
        enable_gqa = q_BHTd.shape[1] != k_BGTd.shape[1]
        return F.scaled_dot_product_attention(
            q_BHTd, k_BGTd, v_BGTd, is_causal=True, scale=scale, enable_gqa=enable_gqa
        )
    # Attention sinks (gpt-oss): a per-head logit joins every softmax and takes mass, no value.
    rep = q_BHTd.shape[1] // k_BGTd.shape[1]
    k_BHTd = k_BGTd.repeat_interleave(rep, dim=1)
    v_BHTd = v_BGTd.repeat_interleave(rep, dim=1)
    scores_BHTT = (q_BHTd @ k_BHTd.transpose(-1, -2)) * scale
    t = q_BHTd.shape[2]
    mask_TT = torch.ones(t, t, dtype=torch.bool, device=q_BHTd.device).tril()
    scores_BHTT = scores_BHTT.masked_fill(~mask_TT, float("-inf"))
    sink_BHT1 = sinks_H.to(scores_BHTT.dtype).view(1, -1, 1, 1).expand(*scores_BHTT.shape[:3], 1)
    probs = torch.cat([scores_BHTT, sink_BHT1], dim=-1).softmax(dim=-1)[..., :-1]
    return probs @ v_BHTd


class Attention(nn.Module):
    """Grouped-query attention with optional q/k norm, biases and attention sinks."""

    def __init__(self, cfg: AttentionConfig, d_model: int, norm_eps: float):
        super().__init__()
        assert cfg.head_dim is not None and cfg.n_kv_heads is not None
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.qk_norm = cfg.qk_norm
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
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        self.interleaved = cfg.rope_interleave
        self.scale = 1.0 / math.sqrt(cfg.head_dim)

    def forward(self, x_BTD: Tensor, positions_T: Tensor) -> Tensor:
        b, t, _ = x_BTD.shape
        q, k, v = self.q_proj(x_BTD), self.k_proj(x_BTD), self.v_proj(x_BTD)
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        q_BTHd = q.view(b, t, self.n_heads, self.head_dim)
        k_BTGd = k.view(b, t, self.n_kv_heads, self.head_dim)
        if self.qk_norm == "head":
            q_BTHd, k_BTGd = self.q_norm(q_BTHd), self.k_norm(k_BTGd)
        q_BHTd, k_BGTd = q_BTHd.transpose(1, 2), k_BTGd.transpose(1, 2)
        v_BGTd = v.view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = self.rope(positions_T)
        q_BHTd = apply_rope(q_BHTd, cos, sin, self.interleaved)
        k_BGTd = apply_rope(k_BGTd, cos, sin, self.interleaved)
        if self.qk_norm == "l2":  # Llama 4: parameter-free RMS normalisation after rotation
            q_BHTd, k_BGTd = (
                F.rms_norm(q_BHTd, (self.head_dim,), eps=self.norm_eps),
                F.rms_norm(k_BGTd, (self.head_dim,), eps=self.norm_eps),
            )
        out_BHTd = causal_attention(q_BHTd, k_BGTd, v_BGTd, self.scale, self.sinks)
        return self.o_proj(out_BHTd.transpose(1, 2).reshape(b, t, -1))


# The latent norms use RMSNorm's default eps whatever the model's norm_eps, as DeepSeek's reference
# code and transformers do (it matters for checkpoints with rms_norm_eps != 1e-6, e.g. 1e-5).
LATENT_NORM_EPS = 1e-6


class LatentAttention(nn.Module):
    """Multi-head latent attention (DeepSeek-V2/V3): low-rank q and a compressed, shared kv latent.

    Each head's query/key is a "nope" part (from the latent) and a rotary part; the key's rotary
    part is one vector shared by all heads (``kv_a_proj_with_mqa``).
    """

    def __init__(self, cfg: AttentionConfig, d_model: int, norm_eps: float):
        super().__init__()
        h = cfg.n_heads
        self.n_heads = h
        self.nope, self.rope_dim, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.kv_lora_rank = cfg.kv_lora_rank
        qk_dim = self.nope + self.rope_dim
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
        self.rope = RotaryEmbedding(self.rope_dim, cfg.rope_theta, cfg.rope_scaling)
        self.interleaved = cfg.rope_interleave
        self.scale = 1.0 / math.sqrt(qk_dim)
        scaling = cfg.rope_scaling or {}
        if scaling.get("mscale_all_dim"):  # YaRN also sharpens the softmax (DeepSeek-V2 paper)
            m = 0.1 * float(scaling["mscale_all_dim"]) * math.log(float(scaling["factor"])) + 1.0
            self.scale *= m * m

    def forward(self, x_BTD: Tensor, positions_T: Tensor) -> Tensor:
        b, t, _ = x_BTD.shape
        h = self.n_heads
        if hasattr(self, "q_proj"):
            q = self.q_proj(x_BTD)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x_BTD)))
        q_BHTd = q.view(b, t, h, -1).transpose(1, 2)
        q_nope, q_rot = q_BHTd.split([self.nope, self.rope_dim], dim=-1)
        latent_BTC, k_rot_BTR = self.kv_a_proj_with_mqa(x_BTD).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        kv = self.kv_b_proj(self.kv_a_layernorm(latent_BTC)).view(b, t, h, -1).transpose(1, 2)
        k_nope, v_BHTd = kv.split([self.nope, self.v_dim], dim=-1)
        cos, sin = self.rope(positions_T)
        q_rot = apply_rope(q_rot, cos, sin, self.interleaved)
        k_rot_B1TR = apply_rope(k_rot_BTR.unsqueeze(1), cos, sin, self.interleaved)
        q_BHTd = torch.cat([q_nope, q_rot], dim=-1)
        k_BHTd = torch.cat([k_nope, k_rot_B1TR.expand(b, h, t, self.rope_dim)], dim=-1)
        out_BHTd = causal_attention(q_BHTd, k_BHTd, v_BHTd, self.scale, None)
        return self.o_proj(out_BHTd.transpose(1, 2).reshape(b, t, -1))


def build_attention(cfg: AttentionConfig, d_model: int, norm_eps: float) -> nn.Module:
    return LatentAttention(cfg, d_model, norm_eps) if cfg.kind == "mla" else Attention(cfg, d_model, norm_eps)
