"""``parallelize``: spread a BUILT model over the processes of a layout.

Parameter placement:
- routed experts: each rank keeps the experts of its expert-parallel slot, a contiguous block of
  GLOBAL expert ids ``ep_rank * E/ep ...``, and of each expert the ``F/etp`` slice of its
  etp index (w1/w3 rows, w2 columns; ``moekit.layers.experts`` documents the layout);
- everything else (embeddings, attention, norms, routers, shared experts, dense FFNs, head) is
  REPLICATED on every rank, with DDP semantics: after backward ``sync_gradients`` averages its
  gradients over the data-parallel ranks (``moekit.parallel.state``). Shared experts are
  replicated, not sliced: they see every token, so slicing them would add an all-reduce per layer
  for little memory.

The MoE blocks get an ``AllToAllDispatcher`` (ep > 1) or a local one, with expert tensor
parallelism's copy/reduce hooks (etp > 1). Model code never branches on rank.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from moekit.config import ConfigError
from moekit.layers.dispatch import LocalDispatcher
from moekit.layers.experts import Experts
from moekit.layers.moe import MoE
from moekit.parallel.expert_parallel import AllToAllDispatcher, copy_to_group, reduce_from_group
from moekit.parallel.groups import ProcessGroups, make_groups
from moekit.parallel.layout import Layout, expert_slice

# Which axis of each expert tensor is the expert width F (sliced by etp); None: not sliced.
F_AXIS = {"w1": 1, "w3": 1, "w2": 2, "b1": 1, "b3": 1, "b2": None}


class ExpertLayoutWarning(UserWarning):
    """The device-level balance loss groups experts differently from how ranks hold them."""


@dataclass(frozen=True)
class ExpertShard:
    """What part of the global experts an ``Experts`` module holds after ``parallelize``."""

    n_experts: int  # global E
    ffn_dim: int  # global F
    experts: slice  # global expert ids held
    ffn: slice  # expert-width columns held


def parallelize(model: nn.Module, layout: Layout, groups: ProcessGroups | None = None) -> nn.Module:
    """Shard ``model``'s experts and install the dispatchers for ``layout``, in place; returns it.

    Call it on every rank, after building (and loading) the full model identically everywhere;
    or on a model built on the meta device, whose expert shapes it slices without any data
    (``moekit.parallel.loading.load_sharded`` then reads only those slices).
    """
    cfg = model.config
    moe = cfg.moe
    world = dist.get_world_size() if dist.is_initialized() else 1
    layout.validate(world, moe.n_routed_experts if moe else None, moe.expert_ffn_dim if moe else None)
    if moe is not None and layout.etp > 1 and moe.expert_bias:
        raise ConfigError(
            f"etp ({layout.etp}) does not support moe.expert_bias (the down-projection bias is not sliced)"
        )
    if moe is not None and moe.device_loss_coef > 0 and layout.ep != moe.n_devices:
        warnings.warn(
            f"ep ({layout.ep}) differs from moe.n_devices ({moe.n_devices}): the device-level balance loss "
            "keeps grouping experts by moe.n_devices (a property of the model), not by the ranks holding them",
            ExpertLayoutWarning,
            stacklevel=2,
        )
    if groups is None:
        groups = make_groups(layout) if world > 1 else None
    model._moekit_parallel = groups  # read by moekit.parallel.state
    if groups is None:
        return model
    hooks = {}
    if groups.etp is not None:
        hooks = {"to_experts": copy_to_group(groups.etp), "from_experts": reduce_from_group(groups.etp)}
    for module in model.modules():
        if not isinstance(module, MoE):
            continue
        if module.impl == "reference":
            raise ConfigError("impl 'reference' (the masked loop over all experts) runs in one process only")
        _shard_experts(module.experts, layout, groups)
        if groups.ep is not None:
            module.dispatcher = AllToAllDispatcher(
                groups.ep, groups.coords.ep_rank, layout.ep, module.experts.shard.n_experts, **hooks
            )
        else:
            module.dispatcher = LocalDispatcher(**hooks)
    return model


@torch.no_grad()
def _shard_experts(ex: Experts, layout: Layout, groups: ProcessGroups) -> None:
    es, fs = expert_slice(layout, groups.coords, ex.n_experts, ex.ffn_dim)
    ex.shard = ExpertShard(ex.n_experts, ex.ffn_dim, es, fs)
    for name, f_axis in F_AXIS.items():
        p = getattr(ex, name)
        if p is None:
            continue
        index = [es] + [slice(None)] * (p.dim() - 1)
        if f_axis is not None:
            index[f_axis] = fs
        setattr(ex, name, nn.Parameter(p[tuple(index)].clone(), requires_grad=p.requires_grad))
    ex.n_experts, ex.ffn_dim = es.stop - es.start, fs.stop - fs.start


def expert_shards(model: nn.Module) -> list[tuple[str, Experts]]:
    """``(qualified name, module)`` of every sharded ``Experts`` module."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, Experts) and hasattr(m, "shard")]


def parallel_groups(model: nn.Module) -> ProcessGroups | None:
    """The groups ``parallelize`` installed (None: one process, or not parallelised)."""
    return getattr(model, "_moekit_parallel", None)
