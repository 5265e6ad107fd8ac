"""Gradients and state of a parallelised model: DDP-style averaging, a global gradient norm,
layout-independent (gathered) state dicts and what each rank holds.

Gradient scaling. Each rank's loss is the mean over its own micro-batch, so the global loss is
the mean of the data-parallel ranks' losses. Replicated parameters: sum over all ranks / world
(the etp ranks of a group hold identical gradients, so this is the mean over data ranks).
Expert shards: the all-to-all already brought every token of the expert-parallel group to them,
so a shard's gradient is the sum over its ep group's losses; summing over its expert-data-parallel
copies gives the sum over all dp losses, which is divided by dp, NOT by the copies (dividing by
dp/ep is the classic "expert gradients ep x too large" bug).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from moekit.parallel.apply import F_AXIS, expert_shards, parallel_groups
from moekit.parallel.layout import expert_slice

# torch 2.13 renamed all_gather_into_tensor (now deprecated) to all_gather_single.
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _split_params(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    expert = [p for _, ex in expert_shards(model) for p in ex.parameters()]
    ids = {id(p) for p in expert}
    replicated = [p for p in model.parameters() if id(p) not in ids]
    return [p for p in replicated if p.requires_grad], [p for p in expert if p.requires_grad]


def _all_reduce_grads(params: list[nn.Parameter], group, divisor: int) -> None:
    if not params:
        return
    for p in params:
        if p.grad is None:  # a parameter no token reached on this rank: its gradient is zero
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params]
    flat = _flatten_dense_tensors(grads)  # NOTE: one collective per kind, not one per tensor
    dist.all_reduce(flat, group=group)
    flat.div_(divisor)
    for g, synced in zip(grads, _unflatten_dense_tensors(flat, grads), strict=True):
        g.copy_(synced)


@torch.no_grad()
def sync_gradients(model: nn.Module) -> None:
    """Average gradients over data-parallel ranks (see the module docstring); call after backward."""
    groups = parallel_groups(model)
    if groups is None:
        return
    replicated, expert = _split_params(model)
    _all_reduce_grads(replicated, None, groups.world_size)
    if groups.edp is not None:
        _all_reduce_grads(expert, groups.edp, groups.layout.dp)
    else:
        for p in expert:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            p.grad.div_(groups.layout.dp)


@torch.no_grad()
def clip_grad_norm_(model: nn.Module, max_norm: float) -> Tensor:
    """Clip to the global gradient norm (every expert shard counted once); returns the norm."""
    groups = parallel_groups(model)
    if groups is None:
        return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    replicated, expert = _split_params(model)
    expert_sq = _sq_sum(expert)
    dist.all_reduce(expert_sq)
    copies = groups.layout.dp // groups.layout.ep  # each shard is held by this many ranks
    total = (_sq_sum(replicated) + expert_sq / copies).sqrt().float()
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for p in replicated + expert:
        if p.grad is not None:
            p.grad.mul_(coef)
    return total


def _sq_sum(params: list[nn.Parameter]) -> Tensor:
    zero = torch.zeros((), dtype=torch.float64, device=_comm_device())
    return sum((p.grad.double().square().sum() for p in params if p.grad is not None), zero)


def all_reduce_sum(t: Tensor) -> Tensor:
    """Sum over every rank (no gradient); identity in one process. Used for routing counts, which
    balance losses normalise, so the etp copies of a micro-batch do not change the result."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return t
    out = t.detach().to(_comm_device(), copy=True)
    dist.all_reduce(out)
    return out.to(t.device)


def _comm_device() -> torch.device:
    """Where collectives need their tensors: the current GPU under NCCL, else the CPU."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# State --------------------------------------------------------------------------------------------


def _gather_full(local: Tensor, name: str, ex, groups) -> Tensor:
    """The full ``[E, ...]`` tensor from every rank's shard of parameter ``name`` of ``ex``."""
    world = groups.world_size
    local = local.detach().contiguous()
    flat = torch.empty(world * local.numel(), dtype=local.dtype, device=local.device)
    _all_gather(flat, local.reshape(-1))  # NOTE: gloo takes the flat (concatenated) form only
    out = flat.view(world, *local.shape)
    shape = list(local.shape)
    shape[0] = ex.shard.n_experts
    f_axis = F_AXIS[name]
    if f_axis is not None:
        shape[f_axis] = ex.shard.ffn_dim
    full = local.new_empty(shape)
    for r in range(world):
        es, fs = expert_slice(groups.layout, groups.layout.coords(r), ex.shard.n_experts, ex.shard.ffn_dim)
        index = [es] + [slice(None)] * (local.dim() - 1)
        if f_axis is not None:
            index[f_axis] = fs
        full[tuple(index)] = out[r]
    return full


def _local_slice(full: Tensor, name: str, ex) -> Tensor:
    index = [ex.shard.experts] + [slice(None)] * (full.dim() - 1)
    if F_AXIS[name] is not None:
        index[F_AXIS[name]] = ex.shard.ffn
    return full[tuple(index)].clone()


def _expert_param_names(model: nn.Module) -> dict[int, tuple[str, str, Any]]:
    """id(param) -> (state-dict key, short name, Experts module) for every expert shard."""
    out = {}
    for prefix, ex in expert_shards(model):
        for name in F_AXIS:
            p = getattr(ex, name)
            if p is not None:
                out[id(p)] = (f"{prefix}.{name}", name, ex)
    return out


def full_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The model's state dict with every expert tensor whole, under global expert ids (the same
    names and shapes as the unparallelised model). Collective: call it on every rank."""
    sd = model.state_dict()
    groups = parallel_groups(model)
    if groups is None:
        return sd
    for key, name, ex in _expert_param_names(model).values():
        sd[key] = _gather_full(sd[key], name, ex, groups)
    return sd


def full_gradients(model: nn.Module) -> dict[str, Tensor | None]:
    """Every parameter's gradient by name, expert ones gathered whole (for checks). Collective."""
    grads = {n: p.grad for n, p in model.named_parameters()}
    groups = parallel_groups(model)
    if groups is not None:
        for key, name, ex in _expert_param_names(model).values():
            grad = getattr(ex, name).grad
            grads[key] = None if grad is None else _gather_full(grad, name, ex, groups)
    return grads


def _opt_params(opt: torch.optim.Optimizer) -> list[nn.Parameter]:
    return [p for g in opt.param_groups for p in g["params"]]


def full_optimizer_state(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    """``opt.state_dict()`` with expert-shaped state (AdamW's moments) gathered whole. Collective."""
    sd = opt.state_dict()
    groups = parallel_groups(model)
    if groups is None:
        return sd
    names = _expert_param_names(model)
    for i, p in enumerate(_opt_params(opt)):
        if id(p) in names and i in sd["state"]:
            _, name, ex = names[id(p)]
            sd["state"][i] = {
                k: _gather_full(v, name, ex, groups) if torch.is_tensor(v) and v.shape == p.shape else v
                for k, v in sd["state"][i].items()
            }
    return sd


def shard_optimizer_state(model: nn.Module, opt: torch.optim.Optimizer, sd: dict[str, Any]) -> dict[str, Any]:
    """The inverse of ``full_optimizer_state``: this rank's slices of a gathered optimizer state."""
    if parallel_groups(model) is None:
        return sd
    names = _expert_param_names(model)
    state = dict(sd["state"])
    for i, p in enumerate(_opt_params(opt)):
        if id(p) in names and i in state:
            _, name, ex = names[id(p)]
            state[i] = {
                k: _local_slice(v, name, ex) if torch.is_tensor(v) and v.dim() == p.dim() and v.dim() > 0 else v
                for k, v in state[i].items()
            }
    return {**sd, "state": state}


def rank_parameters(model: nn.Module) -> dict[str, int]:
    """What this rank actually holds of a (parallelised) model: parameter counts and bytes.

    ``{"params", "bytes", "expert_params", "replicated_params"}``; tied weights count once.
    """
    replicated, expert = [], []
    ids = {id(p) for _, ex in expert_shards(model) for p in ex.parameters()}
    for p in model.parameters():  # unique parameters
        (expert if id(p) in ids else replicated).append(p)
    n_exp, n_rep = sum(p.numel() for p in expert), sum(p.numel() for p in replicated)
    nbytes = sum(p.numel() * p.element_size() for p in expert + replicated)
    return {"params": n_exp + n_rep, "bytes": nbytes, "expert_params": n_exp, "replicated_params": n_rep}
