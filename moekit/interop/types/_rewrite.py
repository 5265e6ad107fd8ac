"""Tensor-name rewrites for ``HFLayout.from_file`` / ``to_file``: renames, fused tensors split and joined.

Splits return views (they work on meta tensors, so checkpoints are checked from their headers);
joins copy, and run only when writing.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
from torch import Tensor


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


def join_rows(parts: list[Tensor], dim: int = 0) -> Tensor:
    return torch.cat(parts, dim=dim)


__all__ = ["join_rows", "rename", "split_rows"]
