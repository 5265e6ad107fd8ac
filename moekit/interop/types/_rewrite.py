"""Tensor-name rewrites for ``HFLayout.from_file`` / ``to_file``: renames, fused tensors split and joined.

Splits return views (they work on meta tensors, so checkpoints are checked from their headers);
joins copy, and run only when writing.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
from torch import Tensor

from moekit.config import ModelConfig


def rename(tensors: dict[str, Tensor], rules: Iterable[tuple[str, str]]) -> dict[str, Tensor]:
    """Every name with the first matching ``(regex, replacement)`` substituted (searched anywhere)."""
    compiled = [(re.compile(p), r) for p, r in rules]
    out: dict[str, Tensor] = {}
    for name, t in tensors.items():
        for pattern, repl in compiled:
            new, n = pattern.subn(repl, name)
            if n:
                name = new
                break
        out[name] = t
    return out


def split_rows(t: Tensor, sizes: list[int], dim: int = 0) -> list[Tensor] | None:
    """``t`` split along ``dim`` into ``sizes``, or None when its length there is not their sum
    (the strict name/shape check then reports the tensor)."""
    if t.dim() <= dim or t.shape[dim] != sum(sizes):
        return None
    return list(t.split(sizes, dim=dim))


def pop_experts(
    tensors: dict[str, Tensor], cfg: ModelConfig, moe: str, names: tuple[str, str, str]
) -> dict[int, tuple[Tensor, Tensor, Tensor]]:
    """Take the per-expert hub tensors of every MoE layer out of ``tensors`` (in place).

    Returns per layer the stacked gate ``[E, F, D]``, up ``[E, F, D]`` and down ``[E, D, F]``
    (copies), for types whose files keep experts fused.
    """
    out = {}
    n = cfg.moe.n_routed_experts if cfg.moe is not None else 0
    for i in cfg.moe_layer_ids:
        base = f"model.layers.{i}.{moe}.experts"
        stacked = [torch.stack([tensors.pop(f"{base}.{j}.{w}.weight") for j in range(n)]) for w in names]
        out[i] = (stacked[0], stacked[1], stacked[2])
    return out


def split_gate_up(tensors: dict[str, Tensor], fused: str, gate: str, up: str) -> None:
    """Replace a fused ``[2F, D]`` gate-then-up tensor named ``fused`` by its halves (views)."""
    t = tensors.pop(fused)
    halves = split_rows(t, [t.shape[0] // 2] * 2) if t.dim() and t.shape[0] % 2 == 0 else None
    if halves is None:  # the strict check reports the odd tensor under its own name
        tensors[fused] = t
        return
    tensors[gate], tensors[up] = halves


__all__ = ["pop_experts", "rename", "split_gate_up", "split_rows"]
