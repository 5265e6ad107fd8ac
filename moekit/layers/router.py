"""The router: a linear gate scoring every expert, then a top-k choice of experts per token.

Shapes: T tokens, D width, E routed experts, K experts per token, G expert groups.
Scores are computed in fp32 whatever the model dtype (router precision matters for stability).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.config import MoEConfig


@dataclass
class Routing:
    """What the router decided for a batch of tokens; losses and statistics read it."""

    logits_TE: Tensor  # raw gate logits (fp32)
    scores_TE: Tensor  # softmax or sigmoid of the logits (fp32), before any selection bias
    idx_TK: Tensor  # chosen experts (int64)
    weights_TK: Tensor  # gate weights applied to the chosen experts' outputs (fp32)
    counts_E: Tensor  # assignments each expert processes (after any capacity dropping)
    keep_TK: Tensor | None = None  # False where an assignment was dropped for capacity


def group_limited_mask(scores_TE: Tensor, n_group: int, topk_group: int, group_score: str) -> Tensor:
    """Boolean ``[T, E]``: experts inside each token's ``topk_group`` best groups (DeepSeek-V2/V3)."""
    t, e = scores_TE.shape
    grouped_TGe = scores_TE.view(t, n_group, e // n_group)
    if group_score == "max":
        group_TG = grouped_TGe.amax(dim=-1)
    else:  # sum of each group's two best scores (DeepSeek-V3)
        group_TG = grouped_TGe.topk(min(2, e // n_group), dim=-1).values.sum(dim=-1)
    keep_idx = group_TG.topk(topk_group, dim=-1).indices
    keep_TG = torch.zeros_like(group_TG, dtype=torch.bool).scatter_(1, keep_idx, True)
    return keep_TG.unsqueeze(-1).expand(t, n_group, e // n_group).reshape(t, e)


class Router(nn.Module):
    """Token-choice top-k router (softmax or sigmoid scores, optional groups and selection bias)."""

    def __init__(self, cfg: MoEConfig, d_model: int):
        super().__init__()
        self.cfg = cfg
        self.n_experts, self.top_k = cfg.n_routed_experts, cfg.top_k
        self.gate = nn.Linear(d_model, cfg.n_routed_experts, bias=cfg.router_bias)
        if cfg.uses_selection_bias:
            # Steers which experts are chosen, never the gate weights (auxiliary-loss-free
            # balancing, Wang et al. 2024); updated outside forward, saved with the model.
            self.register_buffer("selection_bias", torch.zeros(cfg.n_routed_experts))
        else:
            self.selection_bias = None

    def forward(self, x_TD: Tensor) -> Routing:
        cfg = self.cfg
        bias = None if self.gate.bias is None else self.gate.bias.float()
        logits_TE = F.linear(x_TD.float(), self.gate.weight.float(), bias)
        if cfg.score_func == "softmax":
            scores_TE = logits_TE.softmax(dim=-1)
        else:
            scores_TE = logits_TE.sigmoid()
        choice_TE = scores_TE if self.selection_bias is None else scores_TE + self.selection_bias
        if cfg.n_group > 1:
            inside_TE = group_limited_mask(choice_TE, cfg.n_group, cfg.topk_group, cfg.group_score)
            choice_TE = choice_TE.masked_fill(~inside_TE, float("-inf"))
        idx_TK = choice_TE.topk(self.top_k, dim=-1).indices
        weights_TK = scores_TE.gather(1, idx_TK)
        if cfg.norm_topk_prob:
            weights_TK = weights_TK / (weights_TK.sum(dim=-1, keepdim=True) + 1e-20)
        weights_TK = weights_TK * cfg.routed_scaling_factor
        counts_E = torch.bincount(idx_TK.reshape(-1), minlength=self.n_experts)
        return Routing(logits_TE, scores_TE, idx_TK, weights_TK, counts_E)
