"""Token dispatch and combine: parameter-free permutations between tokens and experts.

Shapes: T tokens, K experts per token, N = T*K (token, expert) assignments, D width, E experts,
R ranks of an expert-parallel group, L experts local to one rank (E = R*L).

Assignments are sorted by expert once, so each expert sees one contiguous slice of rows. The MoE
block talks to a *dispatcher* (``LocalDispatcher`` here; ``moekit.parallel`` adds the all-to-all
one): ``dispatch(x_TD, routing) -> Dispatched`` (rows in expert order and rows per local expert),
``combine(y_ND, d) -> y_TD``. A dispatcher's two hooks, ``to_experts`` and ``from_experts``
(identity here), are where expert tensor parallelism enters: what goes into sliced experts is
"copied" into the tensor-parallel group, their partial outputs are summed over it.

Rows received from R ranks arrive rank-major (everything from rank 0, sorted by expert, then rank
1, ...); ``expert_major_order`` is the pure permutation that groups them by local expert.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from moekit.layers.router import Routing


@dataclass
class Dispatch:
    """Where each sorted row comes from and how many rows each expert owns."""

    order_N: Tensor  # flat (token * K + slot) indices of kept assignments, sorted by expert
    token_N: Tensor  # source token of each sorted row
    counts_E: Tensor  # rows per expert (int64); sums to the number of kept assignments


def sort_by_expert(
    idx_TK: Tensor, n_experts: int, keep_TK: Tensor | None = None, counts_E: Tensor | None = None
) -> Dispatch:
    """Group assignments by expert (stable, so tokens keep their order inside an expert).

    ``keep_TK`` (capacity dropping) removes assignments before sorting; dropped ones get no row.
    ``counts_E``, the kept assignments per expert, is reused when the router already counted them.
    """
    flat_N = idx_TK.reshape(-1)
    top_k = idx_TK.shape[-1]
    if keep_TK is None:
        order_N = flat_N.argsort(stable=True)
    else:
        kept = keep_TK.reshape(-1).nonzero().squeeze(-1)
        order_N = kept[flat_N[kept].argsort(stable=True)]
    if counts_E is None:
        # NOTE: scatter_add_, not bincount: bincount sizes its output from the data, a host sync on CUDA.
        expert_N = flat_N[order_N]
        counts_E = torch.zeros(n_experts, dtype=torch.long, device=idx_TK.device).scatter_add_(
            0, expert_N, torch.ones_like(expert_N)
        )
    return Dispatch(order_N=order_N, token_N=order_N // top_k, counts_E=counts_E)


def permute(x_TD: Tensor, d: Dispatch, weights_TK: Tensor | None = None) -> Tensor:
    """Rows of ``x`` in expert order: ``[N, D]``; each scaled by its gate weight if ``weights_TK`` is given."""
    x_ND = x_TD.index_select(0, d.token_N)
    if weights_TK is None:
        return x_ND
    return x_ND * weights_TK.reshape(-1).index_select(0, d.order_N).unsqueeze(-1).to(x_ND.dtype)


def input_scaled(x_TD: Tensor, d: Dispatch, weights_TK: Tensor, scale_input: bool) -> tuple[Tensor, Tensor]:
    """The rows to send and the weights combine will apply: the gate weight goes on the expert's input
    (``scale_input``, Llama 4: ``sum_k expert_k(w_k x)``) or, as usual, on its output."""
    if not scale_input:
        return permute(x_TD, d), weights_TK
    return permute(x_TD, d, weights_TK), torch.ones_like(weights_TK)


def combine(y_ND: Tensor, d: Dispatch, weights_TK: Tensor, n_tokens: int) -> Tensor:
    """Scale each expert row by its gate weight and sum rows back into their tokens: ``[T, D]``."""
    w_N1 = weights_TK.reshape(-1).index_select(0, d.order_N).unsqueeze(-1).to(y_ND.dtype)
    out_TD = y_ND.new_zeros(n_tokens, y_ND.shape[-1])
    return out_TD.index_add(0, d.token_N, y_ND * w_N1)


def expert_major_order(counts_RL: Tensor) -> Tensor:
    """The permutation that turns rank-major rows into expert-major rows: ``perm_N``.

    ``counts_RL[r, l]`` rows for local expert ``l`` came from rank ``r``; the received buffer holds
    rank 0's rows (expert 0's, then expert 1's, ...), then rank 1's, ... ``rows[perm_N]`` holds
    expert 0's rows (from rank 0, then rank 1, ...), then expert 1's, ..., i.e. each local expert's
    rows contiguous, ``counts_RL.sum(0)`` of them. The inverse is ``inverse_order(perm_N)``.
    """
    r, n_local = counts_RL.shape
    flat = counts_RL.reshape(-1)  # rank-major blocks
    start_RL = (flat.cumsum(0) - flat).view(r, n_local)  # where each (rank, expert) block starts
    blocks_LR = counts_RL.t().reshape(-1)  # the same blocks in expert-major order
    starts_LR = start_RL.t().reshape(-1)
    n = int(flat.sum())
    # Row j of the output belongs to block b (expert-major) at offset j - out_start[b].
    out_start = blocks_LR.cumsum(0) - blocks_LR
    block_N = torch.repeat_interleave(torch.arange(blocks_LR.numel(), device=flat.device), blocks_LR, output_size=n)
    return starts_LR[block_N] + torch.arange(n, device=flat.device) - out_start[block_N]


def inverse_order(perm_N: Tensor) -> Tensor:
    """``inv`` with ``rows[perm][inv] == rows``."""
    return torch.empty_like(perm_N).scatter_(0, perm_N, torch.arange(perm_N.numel(), device=perm_N.device))


def _identity(t: Tensor) -> Tensor:
    return t


@dataclass
class Dispatched:
    """What ``dispatch`` hands the experts: their rows in expert order and rows per local expert."""

    x_ND: Tensor  # rows for this process's experts, grouped by expert
    counts_E: Tensor  # rows per local expert
    local: Dispatch  # this process's own sort of its tokens' assignments
    weights_TK: Tensor
    n_tokens: int
    extra: object | None = None  # a dispatcher's own bookkeeping (e.g. all-to-all split sizes)


class LocalDispatcher:
    """Every expert lives in this process: dispatch sorts rows by expert, combine scatters them back.

    ``fused`` is the local fast path: one pass that gathers, runs the experts and scatters the
    gate-weighted outputs (``Experts.routed``) without materialising the ``[N, D]`` rows.
    """

    local = True

    def __init__(
        self,
        to_experts: Callable[[Tensor], Tensor] = _identity,
        from_experts: Callable[[Tensor], Tensor] = _identity,
    ):
        self.to_experts = to_experts  # applied to what enters the experts (x, gate weights)
        self.from_experts = from_experts  # applied to the experts' (partial) outputs

    def sort(self, routing: Routing) -> Dispatch:
        return sort_by_expert(routing.idx_TK, routing.counts_E.shape[0], routing.keep_TK, routing.counts_E)

    def dispatch(self, x_TD: Tensor, routing: Routing, scale_input: bool = False) -> Dispatched:
        """``scale_input``: gate weights scale the rows going in, combine then only sums (Llama 4)."""
        d = self.sort(routing)
        x_ND, weights_TK = input_scaled(x_TD, d, routing.weights_TK, scale_input)
        return Dispatched(self.to_experts(x_ND), d.counts_E, d, weights_TK, x_TD.shape[0])

    def combine(self, y_ND: Tensor, d: Dispatched) -> Tensor:
        return combine(self.from_experts(y_ND), d.local, d.weights_TK, d.n_tokens)

    def fused(self, experts, x_TD: Tensor, routing: Routing) -> Tensor:
        d = self.sort(routing)
        return self.from_experts(experts.routed(self.to_experts(x_TD), d, self.to_experts(routing.weights_TK)))
