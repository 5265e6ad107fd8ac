"""Token dispatch and combine: pure, parameter-free permutations between tokens and experts.

Shapes: T tokens, K experts per token, N = T*K (token, expert) assignments, D width, E experts.
Assignments are sorted by expert once, so each expert sees one contiguous slice of rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Dispatch:
    """Where each sorted row comes from and how many rows each expert owns."""

    order_N: Tensor  # flat (token * K + slot) indices of kept assignments, sorted by expert
    token_N: Tensor  # source token of each sorted row
    counts_E: Tensor  # rows per expert (int64); sums to the number of kept assignments


def sort_by_expert(idx_TK: Tensor, n_experts: int, keep_TK: Tensor | None = None) -> Dispatch:
    """Group assignments by expert (stable, so tokens keep their order inside an expert).

    ``keep_TK`` (capacity dropping) removes assignments before sorting; dropped ones get no row.
    """
    flat_N = idx_TK.reshape(-1)
    top_k = idx_TK.shape[-1]
    if keep_TK is None:
        order_N = flat_N.argsort(stable=True)
    else:
        kept = keep_TK.reshape(-1).nonzero().squeeze(-1)
        order_N = kept[flat_N[kept].argsort(stable=True)]
    # NOTE: scatter_add_, not bincount: bincount sizes its output from the data, a host sync on CUDA.
    expert_N = flat_N[order_N]
    counts_E = torch.zeros(n_experts, dtype=torch.long, device=idx_TK.device).scatter_add_(
        0, expert_N, torch.ones_like(expert_N)
    )
    return Dispatch(order_N=order_N, token_N=order_N // top_k, counts_E=counts_E)


def permute(x_TD: Tensor, d: Dispatch) -> Tensor:
    """Rows of ``x`` in expert order: ``[N, D]``."""
    return x_TD.index_select(0, d.token_N)


def combine(y_ND: Tensor, d: Dispatch, weights_TK: Tensor, n_tokens: int) -> Tensor:
    """Scale each expert row by its gate weight and sum rows back into their tokens: ``[T, D]``."""
    w_N1 = weights_TK.reshape(-1).index_select(0, d.order_N).unsqueeze(-1).to(y_ND.dtype)
    out_TD = y_ND.new_zeros(n_tokens, y_ND.shape[-1])
    return out_TD.index_add(0, d.token_N, y_ND * w_N1)
