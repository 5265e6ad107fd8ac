"""Expert parallelism's all-to-all dispatcher and expert tensor parallelism's two group operations.

Shapes: T tokens, K slots, N rows in expert order, D width, E global experts, R ranks of the
expert-parallel group, L = E / R experts per rank.

``AllToAllDispatcher`` (per-expert counts first, then the tokens; the anchors' sequence):
sort by global expert -> exchange counts ``[R, L]`` (an even all-to-all) -> split sizes to the host
(one sync) -> rows exchanged with an uneven, autograd-aware ``all_to_all_single`` -> rank-major to
expert-major (``expert_major_order``) -> local experts -> the reverse of each step -> combine.
Backward of an all-to-all is the all-to-all with the split sizes swapped (torch's functional
collectives provide it). A rank that receives no rows still takes part in every exchange.

Expert tensor parallelism (distributed-llama's slicing, Megatron's two operations):
``copy_to_group`` is the identity forward and sums gradients over the group backward (every rank
feeds the same input to its slice, so each holds only its slice's share of d input);
``reduce_from_group`` sums the slices' partial outputs forward and is the identity backward
(downstream, every rank of the group computes the same thing).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import Tensor

from moekit.layers.dispatch import (
    Dispatched,
    LocalDispatcher,
    combine,
    expert_major_order,
    input_scaled,
    inverse_order,
    sort_by_expert,
)
from moekit.layers.router import Routing


class _CopyToGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, group: dist.ProcessGroup) -> Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g: Tensor):
        g = g.contiguous().clone()
        dist.all_reduce(g, group=ctx.group)
        return g, None


class _ReduceFromGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, group: dist.ProcessGroup) -> Tensor:
        y = x.contiguous().clone()
        dist.all_reduce(y, group=group)
        return y

    @staticmethod
    def backward(ctx, g: Tensor):
        return g, None


def copy_to_group(group: dist.ProcessGroup):
    return lambda x: _CopyToGroup.apply(x, group)


def reduce_from_group(group: dist.ProcessGroup):
    return lambda x: _ReduceFromGroup.apply(x, group)


@dataclass
class AllToAllStats:
    """Forward all-to-all traffic of one layer since the last ``reset``: bytes this rank sent to
    other ranks (rows to itself excluded) and seconds spent in the exchanges. Backward sends the
    same bytes again (the reverse exchanges), which these counters do not time."""

    bytes_sent: int = 0
    seconds: float = 0.0
    calls: int = 0

    def reset(self) -> None:
        self.bytes_sent, self.seconds, self.calls = 0, 0.0, 0


class AllToAllDispatcher(LocalDispatcher):
    """Sends each row to the rank holding its expert and brings the outputs back."""

    local = False

    def __init__(self, group: dist.ProcessGroup, ep_rank: int, ep_size: int, n_experts: int, **hooks):
        super().__init__(**hooks)
        self.group, self.ep_rank, self.ep_size, self.n_experts = group, ep_rank, ep_size, n_experts
        self.stats = AllToAllStats()

    def _exchange(self, x: Tensor, out_splits: list[int], in_splits: list[int]) -> Tensor:
        t0 = time.perf_counter()
        y = funcol.all_to_all_single_autograd(x.contiguous(), out_splits, in_splits, self.group)
        y = funcol.wait_tensor(y)
        self.stats.seconds += time.perf_counter() - t0
        self.stats.bytes_sent += (sum(in_splits) - in_splits[self.ep_rank]) * x.shape[-1] * x.element_size()
        self.stats.calls += 1
        return y

    def dispatch(self, x_TD: Tensor, routing: Routing, scale_input: bool = False) -> Dispatched:
        d = sort_by_expert(routing.idx_TK, self.n_experts, routing.keep_TK, routing.counts_E)
        r, n_local = self.ep_size, self.n_experts // self.ep_size
        counts_RL = torch.empty_like(d.counts_E)  # rows each source rank sends to each of my experts
        dist.all_to_all_single(counts_RL, d.counts_E.contiguous(), group=self.group)
        counts_RL = counts_RL.view(r, n_local)
        send = d.counts_E.view(r, n_local).sum(1).tolist()  # NOTE: the one host sync of the exchange
        recv = counts_RL.sum(1).tolist()
        x_sorted, weights_TK = input_scaled(x_TD, d, routing.weights_TK, scale_input)
        x_recv = self._exchange(x_sorted, recv, send)
        perm_N = expert_major_order(counts_RL)
        x_ND = self.to_experts(x_recv.index_select(0, perm_N))
        extra = (send, recv, perm_N)
        return Dispatched(x_ND, counts_RL.sum(0), d, weights_TK, x_TD.shape[0], extra)

    def combine(self, y_ND: Tensor, d: Dispatched) -> Tensor:
        send, recv, perm_N = d.extra
        y_recv = self.from_experts(y_ND).index_select(0, inverse_order(perm_N))
        y_sorted = self._exchange(y_recv, send, recv)
        return combine(y_sorted, d.local, d.weights_TK, d.n_tokens)
