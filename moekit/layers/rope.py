"""Rotary position embedding (RoPE, Su et al. 2021) in the "rotate half" layout of HF checkpoints.

Shapes: B batch, T positions, S table length, R rotary width (head_dim, or qk_rope_head_dim for latent
attention).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from moekit.config import ConfigError


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention-temperature factor ``0.1 * mscale * ln(scale) + 1`` (1 when not scaled)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_frequencies(dim: int, theta: float, scaling: dict[str, Any] | None) -> tuple[Tensor, float]:
    """Inverse frequencies ``[R/2]`` and the factor cos/sin are multiplied by.

    Supports no scaling, "linear", "llama3" (Llama 3/4: low frequencies divided by ``factor``,
    high ones kept, a smooth ramp between), "yarn" (DeepSeek-V3, gpt-oss; Peng et al. 2023) and
    "longrope" (Phi-3.5; Ding et al. 2024: one rescale factor per frequency). For longrope these
    are its ``short_factor`` frequencies, which transformers 5's PhiMoE uses at every length (its
    ``long_factor`` never reaches the rotary embedding); the factor is ``short_mscale`` when given
    (``RotaryEmbedding`` switches to ``long_mscale`` past ``original_max_position_embeddings``),
    else ``attention_factor``, else LongRoPE's ``sqrt(1 + ln(factor) / ln(original))``.
    """
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device="cpu") / dim)
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

        low, high = correction_dim(beta_fast), correction_dim(beta_slow)
        if scaling.get("truncate", True):  # gpt-oss: False, the ramp starts and ends between dims
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001
        ramp = ((torch.arange(dim // 2, dtype=torch.float64, device="cpu") - low) / (high - low)).clamp(0, 1)
        extrapolation = 1 - ramp
        inv_freq = (inv_freq / factor) * (1 - extrapolation) + inv_freq * extrapolation
        attention_factor = scaling.get("attention_factor")
        if attention_factor is None:
            mscale, mscale_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
            if mscale and mscale_all:
                attention_factor = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all)
            else:
                attention_factor = yarn_mscale(factor)
        return inv_freq.float(), float(attention_factor)
    if kind == "longrope":
        short = scaling.get("short_factor")
        base_len = scaling.get("original_max_position_embeddings")
        if not isinstance(short, list) or len(short) != dim // 2 or base_len is None:
            raise ConfigError(
                f"attention.rope_scaling (longrope) needs a short_factor list of {dim // 2} numbers "
                "and original_max_position_embeddings"
            )
        inv_freq = inv_freq / torch.tensor(short, dtype=torch.float64, device="cpu")
        if scaling.get("short_mscale") is not None:
            return inv_freq.float(), float(scaling["short_mscale"])
        attention_factor = scaling.get("attention_factor")
        if attention_factor is None:
            attention_factor = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(base_len))
        return inv_freq.float(), float(attention_factor)
    raise ConfigError(
        f"attention.rope_scaling type {kind!r} is not supported (expected linear, llama3, yarn or longrope)"
    )


class RotaryEmbedding(nn.Module):
    """cos/sin tables for given positions, looked up in a table computed once per device.

    ``positions`` is ``[T]`` (every sequence at the same positions) giving ``[T, R]`` tables, or
    ``[B, T]`` (left-padded batches: each row counts its own real tokens) giving ``[B, 1, T, R]``,
    which broadcasts over heads. The table covers ``max_positions`` (or, when None, grows to the
    largest position seen). It is a plain attribute, not a buffer: it is not part of the state
    dict, costs nothing on the meta device and is rebuilt on first use on another device.
    """

    def __init__(self, dim: int, theta: float, scaling: dict[str, Any] | None = None, max_positions: int | None = None):
        super().__init__()
        self.dim, self.theta, self.scaling, self.max_positions = dim, theta, scaling, max_positions
        self.inv_freq, self.attention_factor = rope_frequencies(dim, theta, scaling)
        # PhiMoE's LongRoPE: cos/sin times long_mscale / short_mscale when the pass reaches past
        # original_max_position_embeddings (transformers decides per forward call, as here).
        self.long_switch: tuple[int, float] | None = None
        sc = scaling or {}
        if sc.get("rope_type", sc.get("type")) == "longrope" and sc.get("long_mscale") is not None:
            ratio = float(sc["long_mscale"]) / self.attention_factor
            if ratio != 1.0:
                self.long_switch = (int(sc["original_max_position_embeddings"]), ratio)
        self._table: tuple[Tensor, Tensor] | None = None  # cos_SR, sin_SR
        self._memo: tuple[Tensor, tuple[Tensor, Tensor]] | None = None

    def table(self, n: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """cos and sin ``[S, R]`` for positions ``0 .. S-1``, ``S >= n``."""
        if self._table is None or self._table[0].device != device or self._table[0].shape[0] < n:
            size = max(n, self.max_positions or 0)
            # Same arithmetic as computing each call (fp32 product, then cos/sin), so the lookup is exact.
            angles_SR = torch.outer(torch.arange(size, device=device).float(), self.inv_freq.to(device)).repeat(1, 2)
            self._table = (angles_SR.cos() * self.attention_factor, angles_SR.sin() * self.attention_factor)
        return self._table

    def forward(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        # NOTE: every layer of a model shares one RotaryEmbedding and receives the same positions
        # tensor in a forward pass, so the lookup is done once per pass, not once per layer.
        if self._memo is not None and self._memo[0] is positions:
            return self._memo[1]
        n = self.max_positions if self.max_positions is not None else int(positions.max()) + 1
        cos_SR, sin_SR = self.table(n, positions.device)
        cos, sin = cos_SR[positions], sin_SR[positions]
        if positions.dim() == 2:  # [B, T, R] -> [B, 1, T, R]
            cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        if self.long_switch is not None and int(positions.max()) + 1 > self.long_switch[0]:
            cos, sin = cos * self.long_switch[1], sin * self.long_switch[1]
        self._memo = (positions, (cos, sin))
        return cos, sin


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x_BHTR: Tensor, cos_TR: Tensor, sin_TR: Tensor, interleaved: bool = False) -> Tensor:
    """Rotate ``x``; ``interleaved`` first regroups (x0, x1, x2, x3, ...) pairs into halves.

    ``x * cos + rotate_half(x) * sin``, computed as ``x * cos + roll(x) * (sin with its first half
    negated)``: rotate_half(x) is roll(x) with its first half negated, and moving that sign onto
    ``sin`` is exact, so the result is bit-for-bit the same (for any ``sin``).
    """
    if interleaved:
        *lead, r = x_BHTR.shape
        x_BHTR = x_BHTR.view(*lead, r // 2, 2).transpose(-1, -2).reshape(*lead, r)
    if cos_TR.dtype != x_BHTR.dtype:
        cos_TR, sin_TR = cos_TR.to(x_BHTR.dtype), sin_TR.to(x_BHTR.dtype)
    # NOTE: 4 ops instead of 8 (chunk, neg, cat and two dtype casts), per q and k of every layer:
    # at batch-1 decode a rotation costs its op count, not its arithmetic.
    return x_BHTR * cos_TR + x_BHTR.roll(x_BHTR.shape[-1] // 2, dims=-1) * _half_negated(sin_TR)


def _half_negated(sin_TR: Tensor) -> Tensor:
    """``sin`` with its first half negated, memoised for the last table seen: every layer of a
    forward pass gets the same cos/sin tensors from the shared ``RotaryEmbedding``."""
    memo = _NEGATED.get(id(sin_TR))
    if memo is not None and memo[0] is sin_TR:
        return memo[1]
    s1, s2 = sin_TR.chunk(2, dim=-1)
    signed = torch.cat((-s1, s2), dim=-1)
    _NEGATED.clear()  # one entry: the tables of the current forward pass
    _NEGATED[id(sin_TR)] = (sin_TR, signed)
    return signed


_NEGATED: dict[int, tuple[Tensor, Tensor]] = {}
