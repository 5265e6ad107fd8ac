"""Load-balancing losses, the auxiliary-loss-free bias update and routing statistics.

Losses and statistics are pure functions of the ``Routing`` objects the MoE layers return (in
``ModelOutput.routing``); nothing is kept in global state. The one piece of mutable balancing
state, the aux-free selection bias, is a buffer of each ``Router``, changed only by
``update_selection_bias`` between steps.

Losses (each weighted by its ``MoEConfig`` coefficient, summed over MoE layers by
``balance_loss``; layers without a learned router, i.e. hash routing, add nothing):
- ``switch_aux_loss``: Switch/GShard ``E * sum_i f_i P_i`` (Fedus et al. 2021), which is also
  DeepSeekMoE's expert-level loss (Dai et al. 2024, alpha_1), see its docstring;
- ``device_balance_loss``: DeepSeekMoE's device-level loss (alpha_2);
- ``seq_balance_loss``: DeepSeek-V3's sequence-wise balance loss;
- ``router_z_loss``: ST-MoE's router z-loss (Zoph et al. 2022).

Shapes: T tokens (B sequences of S, batch-major), E routed experts, K slots per token.

Data parallelism: the losses built on batch-wide expert loads (``switch_aux_loss``,
``device_balance_loss``) take ``reduce``, a function summing a tensor over the data-parallel
ranks (``moekit.parallel.all_reduce_sum``). The loads f_i then come from the GLOBAL batch, while
P_i stays this rank's mean: the ranks' losses average to the one-process loss of the global
batch, and so do their gradients (Megatron computes it the same way). The per-sequence and
per-token losses (``seq_balance_loss``, ``router_z_loss``) need nothing: a mean of equal local
means is the global mean. The aux-free update is given globally summed loads by the caller.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor, nn

from moekit.config import MoEConfig
from moekit.layers.router import Router, Routing

Reduce = Callable[[Tensor], Tensor]  # sums a tensor over data-parallel ranks


def chosen_counts(routing: Routing, n_seqs: int = 1) -> Tensor:
    """Assignments the router chose per expert, before capacity dropping: ``[n_seqs, E]`` float.

    This is the router's preference, what balancing acts on; ``routing.counts_E`` is what the
    experts computed after dropping.
    """
    t, k = routing.idx_TK.shape
    e = routing.counts_E.shape[0]
    if t % n_seqs:
        raise ValueError(f"{t} tokens do not split into {n_seqs} equal sequences")
    ones_TK = torch.ones(t, k, device=routing.idx_TK.device)
    mask_TK = ones_TK if routing.chosen_TK is None else routing.chosen_TK.float()
    c_TE = torch.zeros(t, e, device=mask_TK.device).scatter_add_(1, routing.idx_TK, mask_TK)
    return c_TE.view(n_seqs, t // n_seqs, e).sum(dim=1)


def router_probs(routing: Routing) -> Tensor:
    """Per-token router distribution ``[T, E]``: the scores normalised to sum to 1.

    A no-op for softmax scores; for sigmoid scores this is DeepSeek-V3's ``s'``.
    """
    if routing.scores_TE is None:
        raise ValueError("this routing has no learned scores (hash routing)")
    return routing.scores_TE / routing.scores_TE.sum(dim=-1, keepdim=True)


def switch_aux_loss(routing: Routing, reduce: Reduce | None = None) -> Tensor:
    """Switch/GShard balance loss ``E * sum_i f_i * P_i`` (Fedus et al. 2021, eq. 4).

    f_i: the fraction of chosen assignments that went to expert i (no gradient, counted before
    capacity dropping, as Switch does); P_i: the mean router probability of expert i (the
    gradient path). Perfectly uniform routing gives its minimum, 1, for any K.

    DeepSeekMoE's expert-level loss ``alpha_1 * sum_i f'_i P_i`` with ``f'_i = E/(K T) *
    count_i`` is the same number: ``f'_i = E * count_i / (K T) = E * f_i``. So ``aux_loss_coef``
    is both Switch's alpha and DeepSeekMoE's alpha_1, and one function serves both.
    ``reduce`` sums the loads over data-parallel ranks (see the module docstring).
    """
    counts_E = chosen_counts(routing)[0]
    if reduce is not None:
        counts_E = reduce(counts_E)
    f_E = counts_E / counts_E.sum()
    p_E = router_probs(routing).mean(dim=0)
    return counts_E.numel() * (f_E * p_E).sum()


def device_balance_loss(routing: Routing, n_devices: int, reduce: Reduce | None = None) -> Tensor:
    """DeepSeekMoE device-level loss ``sum_d f''_d P''_d`` (Dai et al. 2024, eq. 14-16).

    Experts are split into ``n_devices`` equal contiguous groups; f''_d is the mean of the
    expert-level ``f'_i = E * count_i / (K T)`` over group d, P''_d the sum of P_i over it.
    Uniform routing gives 1, as does any routing that balances the devices exactly.
    The groups are the config's ``moe.n_devices``, whatever the processes' layout.
    """
    counts_E = chosen_counts(routing)[0]
    if reduce is not None:
        counts_E = reduce(counts_E)
    e = counts_E.numel()
    if e % n_devices:
        raise ValueError(f"{e} experts do not split into {n_devices} devices")
    f_E = e * counts_E / counts_E.sum()
    p_E = router_probs(routing).mean(dim=0)
    return (f_E.view(n_devices, -1).mean(dim=1) * p_E.view(n_devices, -1).sum(dim=1)).sum()


def seq_balance_loss(routing: Routing, n_seqs: int | None = None) -> Tensor:
    """DeepSeek-V3 sequence-wise balance loss, averaged over the batch's sequences (eq. 17-20).

    Per sequence of S tokens: ``f_i = E/(K S) * count_i``, ``P_i = mean_t s'_{i,t}`` with s' the
    scores normalised per token, ``L = sum_i f_i P_i`` (1 when the sequence is balanced).
    ``n_seqs`` defaults to ``routing.n_seqs``, which the MoE layer sets from its input's shape.
    """
    b = routing.n_seqs if n_seqs is None else n_seqs
    counts_BE = chosen_counts(routing, b)
    e = counts_BE.shape[-1]
    f_BE = e * counts_BE / counts_BE.sum(dim=-1, keepdim=True)
    p_BE = router_probs(routing).view(b, -1, e).mean(dim=1)
    return (f_BE * p_BE).sum(dim=-1).mean()


def router_z_loss(routing: Routing) -> Tensor:
    """ST-MoE router z-loss: the mean over tokens of ``logsumexp(logits)^2`` (Zoph et al. 2022)."""
    if routing.logits_TE is None:
        raise ValueError("this routing has no router logits (hash routing)")
    return torch.logsumexp(routing.logits_TE, dim=-1).square().mean()


def balance_terms(routings: Sequence[Routing], cfg: MoEConfig, reduce: Reduce | None = None) -> dict[str, Tensor]:
    """Each enabled balance loss, weighted by its coefficient and summed over MoE layers.

    ``reduce`` sums loads over data-parallel ranks (one call per layer and loss).

    Keys (present only when the coefficient is > 0): "aux", "device", "seq_aux", "z".
    """
    learned = [r for r in routings if r.scores_TE is not None]
    terms = {}
    if cfg.aux_loss_coef > 0:
        terms["aux"] = cfg.aux_loss_coef * _sum(switch_aux_loss(r, reduce) for r in learned)
    if cfg.device_loss_coef > 0:
        terms["device"] = cfg.device_loss_coef * _sum(device_balance_loss(r, cfg.n_devices, reduce) for r in learned)
    if cfg.seq_aux_loss_coef > 0:
        terms["seq_aux"] = cfg.seq_aux_loss_coef * _sum(seq_balance_loss(r) for r in learned)
    if cfg.z_loss_coef > 0:
        terms["z"] = cfg.z_loss_coef * _sum(router_z_loss(r) for r in learned)
    return terms


def balance_loss(routings: Sequence[Routing], cfg: MoEConfig) -> Tensor:
    """The configured balance losses, a scalar to add to the LM loss (0 when none is enabled).

    Use ``balance_terms`` for the components, to log them.
    """
    terms = balance_terms(routings, cfg)
    if terms:
        return _sum(terms.values())
    device = routings[0].idx_TK.device if routings else None
    return torch.zeros((), device=device)


def _sum(values: Iterable[Tensor]) -> Tensor:
    total = None
    for v in values:
        total = v if total is None else total + v
    return total if total is not None else torch.zeros(())


@torch.no_grad()
def update_selection_bias(model: nn.Module, loads: Sequence[Routing | Tensor], rate: float | None = None) -> None:
    """Auxiliary-loss-free balancing (Wang et al. 2024): ``b_i += rate * sign(mean load - load_i)``.

    Call after each optimiser step. ``model`` is the model, an MoE layer or a ``Router``; its
    routers that have a selection bias are updated in module order, which is layer order, so
    ``loads`` is ``ModelOutput.routing`` or one ``[E]`` tensor of assignment counts per such
    router (sum them over gradient-accumulation micro-batches). ``rate`` defaults to each
    router's ``cfg.aux_free_rate``. The bias only shifts which experts are chosen; gate weights
    still come from the unbiased scores.

    NOTE: with data parallelism all-reduce the counts first, or the ranks' biases diverge.
    """
    routers = [m for m in model.modules() if isinstance(m, Router) and m.selection_bias is not None]
    if len(routers) != len(loads):
        raise ValueError(f"got {len(loads)} loads for {len(routers)} routers with a selection bias")
    for router, load in zip(routers, loads, strict=True):
        assert router.selection_bias is not None
        load_E = chosen_counts(load)[0] if isinstance(load, Routing) else load.float()
        gamma = router.cfg.aux_free_rate if rate is None else rate
        router.selection_bias.add_(gamma * torch.sign(load_E.mean() - load_E).to(router.selection_bias))


def max_vio(counts_E: Tensor) -> float:
    """MaxVio = max load / mean load - 1 (Wang et al. 2024, aux-loss-free balancing)."""
    counts = counts_E.float()
    mean = counts.mean()
    return float(counts.max() / mean - 1) if mean > 0 else 0.0


_STATS = ("max_vio", "cv", "entropy", "drop_frac", "unrouted_frac", "top_share")


@torch.no_grad()
def routing_stats(
    routings: Sequence[Routing],
    layer_ids: Sequence[int] | None = None,
    *,
    collapse_top: float = 0.1,
    collapse_share: float = 0.5,
) -> dict:
    """Routing statistics per MoE layer and averaged over layers, with one device-to-host copy.

    Per layer, on the router's chosen assignments (``load``, before capacity dropping):
    - ``max_vio``: max load / mean load - 1 (0 when balanced); ``cv``: std / mean of the load;
    - ``entropy``: mean per-token entropy (nats) of the normalised scores (log E is uniform;
      NaN for hash routing, which has no scores);
    - ``drop_frac``: fraction of chosen assignments dropped for capacity; ``unrouted_frac``:
      fraction of tokens that no expert computes (all dropped, or untaken by expert choice);
    - ``top_share``: the share of assignments taken by the busiest ``ceil(collapse_top * E)``
      experts; the layer is ``collapsed`` when it exceeds ``collapse_share`` (by default: the top
      10% of experts take more than half of the assignments), judged only where those experts'
      fair share is at most half of ``collapse_share`` (E >= 4 by default: with 2 experts any
      imbalance would count);
    - ``tokens_per_expert``: assignments each expert computed (after dropping);
      ``load_per_expert``: assignments the router chose.

    Returns ``{"max_vio", "max_vio_max", "cv", "entropy", "drop_frac", "unrouted_frac",
    "collapsed", "warning", "layers"}``: means over layers (``max_vio_max`` the worst layer), a
    warning message naming collapsed layers (or None) and the per-layer dicts.
    """
    if layer_ids is None:
        layer_ids = list(range(len(routings)))
    if len(layer_ids) != len(routings):
        raise ValueError(f"{len(layer_ids)} layer ids for {len(routings)} routings")
    if not routings:
        empty = dict.fromkeys(("max_vio", "max_vio_max", "cv", "entropy", "drop_frac", "unrouted_frac"))
        return {**empty, "collapsed": False, "warning": None, "layers": []}
    blocks, sizes = [], []
    for r in routings:
        load_E = chosen_counts(r)[0]
        kept_E = r.counts_E.float()
        zero = load_E.new_zeros(())
        mean, total = load_E.mean(), load_E.sum().clamp_min(1)
        if r.scores_TE is None:
            entropy = torch.full_like(zero, float("nan"))
        else:
            entropy = torch.special.entr(router_probs(r)).sum(dim=-1).mean()
        unrouted = zero if r.keep_TK is None or r.keep_TK.numel() == 0 else (~r.keep_TK.any(dim=-1)).float().mean()
        n_top = max(1, math.ceil(collapse_top * load_E.numel()))
        row_6 = torch.stack(
            [
                torch.where(mean > 0, load_E.max() / mean - 1, zero),
                torch.where(mean > 0, load_E.std(correction=0) / mean, zero),
                entropy,
                1 - kept_E.sum() / total,
                unrouted,
                load_E.topk(n_top).values.sum() / total,
            ]
        )
        blocks.append(torch.cat([row_6, kept_E, load_E]))
        sizes.append(load_E.numel())
    # NOTE: everything reaches the host in one copy, so logging every step costs one sync.
    flat = torch.cat(blocks).tolist()
    layers, offset = [], 0
    for lid, e in zip(layer_ids, sizes, strict=True):
        vals = flat[offset : offset + len(_STATS) + 2 * e]
        offset += len(vals)
        layer = {"layer": lid, **dict(zip(_STATS, vals[: len(_STATS)], strict=True))}
        layer["tokens_per_expert"] = [round(c) for c in vals[len(_STATS) : len(_STATS) + e]]
        layer["load_per_expert"] = [round(c) for c in vals[len(_STATS) + e :]]
        fair_share = max(1, math.ceil(collapse_top * e)) / e  # their share under perfect balance
        layer["collapsed"] = layer["top_share"] > collapse_share and fair_share <= collapse_share / 2
        layers.append(layer)
    n = len(layers)
    out: dict = {k: sum(la[k] for la in layers) / n for k in ("max_vio", "cv", "drop_frac", "unrouted_frac")}
    out["max_vio_max"] = max(la["max_vio"] for la in layers)
    ent = [la["entropy"] for la in layers if not math.isnan(la["entropy"])]
    out["entropy"] = sum(ent) / len(ent) if ent else float("nan")
    collapsed = [la for la in layers if la["collapsed"]]
    out["collapsed"] = bool(collapsed)
    out["warning"] = None
    if collapsed:
        worst = max(collapsed, key=lambda la: la["top_share"])
        e = len(worst["load_per_expert"])
        out["warning"] = (
            f"routing collapse in MoE layer(s) {', '.join(str(la['layer']) for la in collapsed)}: "
            f"the busiest {max(1, math.ceil(collapse_top * e))} of {e} experts take "
            f"{worst['top_share']:.0%} of assignments (layer {worst['layer']}; threshold {collapse_share:.0%})"
        )
    out["layers"] = layers
    return out
