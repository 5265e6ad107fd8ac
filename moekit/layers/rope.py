"""Rotary position embedding (RoPE, Su et al. 2021) in the "rotate half" layout of HF checkpoints.

Shapes: T positions, R rotary width (head_dim, or qk_rope_head_dim for latent attention).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from moekit.config import ConfigError


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_frequencies(dim: int, theta: float, scaling: dict[str, Any] | None) -> tuple[Tensor, float]:
    """Inverse frequencies ``[R/2]`` and the factor cos/sin are multiplied by.

    Supports no scaling, "linear", "llama3" (Llama 3/4: low frequencies divided by ``factor``,
    high ones kept, a smooth ramp between) and "yarn" (DeepSeek-V3, gpt-oss; Peng et al. 2023).
    """
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if scaling is None or kind == "default":
        return inv_freq.float(), 1.0
    factor = float(scaling.get("factor", 1.0))
    if kind == "linear":
        return (inv_freq / factor).float(), 1.0
    if kind == "llama3":
        old_len = float(scaling.get("original_max_position_embeddings", 8192))
        low, high = float(scaling.get("low_freq_factor", 1.0)), float(scaling.get("high_freq_factor", 4.0))
        wavelen = 2 * math.pi / inv_freq
        smooth = ((old_len / wavelen - low) / (high - low)).clamp(0, 1)
        # smooth = 0 for long wavelengths (scaled fully), 1 for short ones (kept).
        return ((1 - smooth) * inv_freq / factor + smooth * inv_freq).float(), 1.0
    if kind == "yarn":
        base_len = scaling.get("original_max_position_embeddings")
        if base_len is None:
            raise ConfigError("attention.rope_scaling (yarn) needs original_max_position_embeddings")
        beta_fast, beta_slow = float(scaling.get("beta_fast", 32)), float(scaling.get("beta_slow", 1))

        def correction_dim(n_rot: float) -> float:
            return (dim * math.log(base_len / (n_rot * 2 * math.pi))) / (2 * math.log(theta))

        low = max(math.floor(correction_dim(beta_fast)), 0)
        high = min(math.ceil(correction_dim(beta_slow)), dim - 1)
        if low == high:
            high += 0.001
        ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
        extrapolation = 1 - ramp
        inv_freq = (inv_freq / factor) * (1 - extrapolation) + inv_freq * extrapolation
        attention_factor = scaling.get("attention_factor")
        if attention_factor is None:
            mscale, mscale_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
            if mscale and mscale_all:
                attention_factor = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all)
            else:
                attention_factor = _yarn_mscale(factor)
        return inv_freq.float(), float(attention_factor)
    raise ConfigError(f"attention.rope_scaling type {kind!r} is not supported (expected linear, llama3 or yarn)")


class RotaryEmbedding(nn.Module):
    """Computes cos/sin tables ``[T, R]`` for given positions (no state: cheap and meta-safe)."""

    def __init__(self, dim: int, theta: float, scaling: dict[str, Any] | None = None):
        super().__init__()
        self.dim, self.theta, self.scaling = dim, theta, scaling
        _, self.attention_factor = rope_frequencies(dim, theta, scaling)

    def forward(self, positions_T: Tensor) -> tuple[Tensor, Tensor]:
        inv_freq, factor = rope_frequencies(self.dim, self.theta, self.scaling)
        angles_TR = torch.outer(positions_T.float(), inv_freq.to(positions_T.device)).repeat(1, 2)
        return angles_TR.cos() * factor, angles_TR.sin() * factor


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x_BHTR: Tensor, cos_TR: Tensor, sin_TR: Tensor, interleaved: bool = False) -> Tensor:
    """Rotate ``x``; ``interleaved`` first regroups (x0, x1, x2, x3, ...) pairs into halves."""
    if interleaved:
        *lead, r = x_BHTR.shape
        x_BHTR = x_BHTR.view(*lead, r // 2, 2).transpose(-1, -2).reshape(*lead, r)
    cos, sin = cos_TR.to(x_BHTR.dtype), sin_TR.to(x_BHTR.dtype)
    return x_BHTR * cos + rotate_half(x_BHTR) * sin
