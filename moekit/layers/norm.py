"""Normalisation layers: RMSNorm (most MoE LMs), LayerNorm with bias (PhiMoE) or without (DBRX)."""

from __future__ import annotations

from torch import nn


def build_norm(kind: str, dim: int, eps: float) -> nn.Module:
    """``nn.RMSNorm`` or ``nn.LayerNorm`` (with or without bias) over the last ``dim`` features."""
    if kind == "rmsnorm":
        return nn.RMSNorm(dim, eps=eps)
    if kind == "layernorm":
        return nn.LayerNorm(dim, eps=eps)
    if kind == "layernorm_nobias":
        return nn.LayerNorm(dim, eps=eps, bias=False)
    raise ValueError(f"unknown norm kind {kind!r}")
