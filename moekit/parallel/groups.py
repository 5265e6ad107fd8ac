"""The torch.distributed process groups of a layout: expert-parallel, expert-tensor-parallel and
expert-data-parallel groups of this rank (``None`` where a group would hold one rank).

Every rank creates every group in the same order (``dist.new_group`` is collective) and keeps the
ones it belongs to.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist

from moekit.parallel.layout import Layout, RankCoords


@dataclass
class ProcessGroups:
    layout: Layout
    coords: RankCoords
    ep: dist.ProcessGroup | None  # same etp column, same block of ep consecutive data ranks
    etp: dist.ProcessGroup | None  # same data rank: shares tokens, holds the other slices of its experts
    edp: dist.ProcessGroup | None  # holds the same expert shard: expert gradients are summed here

    @property
    def world_size(self) -> int:
        return self.layout.world_size


def make_groups(layout: Layout) -> ProcessGroups:
    """This rank's groups for ``layout`` (the default process group must be initialised)."""
    rank = dist.get_rank()
    all_coords = [layout.coords(r) for r in range(layout.world_size)]

    def pick(key) -> dist.ProcessGroup | None:
        members: dict[tuple, list[int]] = {}
        for c in all_coords:
            members.setdefault(key(c), []).append(c.rank)
        mine = None
        for ranks in members.values():  # dict order is the same on every rank
            if len(ranks) == 1:
                continue
            group = dist.new_group(ranks)
            if rank in ranks:
                mine = group
        return mine

    ep = pick(lambda c: (c.etp_index, c.edp_index))
    etp = pick(lambda c: c.dp_index)
    edp = pick(lambda c: (c.etp_index, c.ep_rank))
    return ProcessGroups(layout, layout.coords(rank), ep, etp, edp)
