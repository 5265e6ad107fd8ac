"""Tensor-name rewrites for ``HFLayout.from_file`` / ``to_file``: renames, fused tensors split and joined.

Splits return views (they work on meta tensors, so checkpoints are checked from their headers)
and raise ``CheckpointError`` naming the file's tensor when its shape is wrong; joins copy, and run
only when writing.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
from torch import Tensor

from moekit.config import ModelConfig
from moekit.errors import CheckpointError


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


def split_rows(name: str, t: Tensor, sizes: list[int]) -> list[Tensor]:
    """The file tensor ``name`` split along dim 0 into ``sizes`` (views); its height must be their sum."""
    if t.dim() != 2 or t.shape[0] != sum(sizes):
        want = f"({sum(sizes)}, ...)" if t.dim() == 2 else "a matrix"
        raise CheckpointError(f"tensor {name!r} has shape {tuple(t.shape)}, expected {want}")
    return list(t.split(sizes))


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


def split_gate_up(tensors: dict[str, Tensor], fused: str, gate: str, up: str, width: int) -> None:
    """Replace a fused ``[2F, D]`` gate-then-up tensor named ``fused`` by its halves (views)."""
    tensors[gate], tensors[up] = split_rows(fused, tensors.pop(fused), [width, width])


__all__ = ["pop_experts", "rename", "split_gate_up", "split_rows"]
