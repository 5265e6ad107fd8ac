"""Load-balancing losses, the auxiliary-loss-free bias update and routing statistics.

All functions are pure: they read ``Routing`` objects returned by the MoE layers and return
tensors or plain numbers; nothing is kept in global state.
Shapes: T tokens, E routed experts, K experts per token.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moekit.config import MoEConfig
from moekit.layers.router import Routing


def switch_aux_loss(routing: Routing) -> Tensor:
    """Switch/GShard balance loss ``E * sum_i f_i * P_i`` (Fedus et al. 2021, eq. 4).

    f_i: fraction of assignments routed to expert i (no gradient); P_i: mean router probability
    of expert i. Equals 1 (its minimum for top-1) when routing is perfectly uniform; with top-k
    f sums to 1 over experts, so the minimum stays 1.
    """
    e = routing.scores_TE.shape[-1]
    f_E = torch.bincount(routing.idx_TK.reshape(-1), minlength=e).float() / routing.idx_TK.numel()
    p_E = routing.scores_TE.mean(dim=0)
    return e * (f_E * p_E).sum()


def balance_loss(routings: list[Routing], cfg: MoEConfig) -> Tensor:
    """The configured balance losses summed over MoE layers (a scalar; 0 when none is enabled)."""
    if not routings:
        return torch.zeros(())
    total = routings[0].logits_TE.new_zeros(())
    for r in routings:
        if cfg.aux_loss_coef:
            total = total + cfg.aux_loss_coef * switch_aux_loss(r)
    return total


def max_vio(counts_E: Tensor) -> float:
    """MaxVio = max load / mean load - 1 (Wang et al. 2024, aux-loss-free balancing)."""
    counts = counts_E.float()
    mean = counts.mean()
    return float(counts.max() / mean - 1) if mean > 0 else 0.0
