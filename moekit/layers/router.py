"""Routers: which experts each token goes to, and with what gate weight.

One ``Router`` module holds the learned gate ``Linear(D, E)`` (plus the noise ``Linear(D, E)`` of
noisy top-k) and the buffers (the selection bias of auxiliary-loss-free balancing, the hash table
of hash routing); ``MoEConfig.router`` picks the rule, each a pure function below:

- "topk", token choice: scores = softmax or sigmoid of the logits; top-k of the scores (plus the
  selection bias, inside the best ``topk_group`` groups when ``n_group > 1``); the weights are the
  chosen scores, renormalised if ``norm_topk_prob``, times ``routed_scaling_factor``.
  softmax -> top-k without renormalising is DeepSeekMoE / Qwen-MoE; with renormalising it is
  exactly Mixtral's top-k of the logits -> softmax over the chosen, so that has no second path;
  sigmoid + renormalise + scale + groups is DeepSeek-V3.
- "switch": Switch Transformer top-1 (Fedus et al. 2021); the weight is the softmax probability,
  never renormalised (``norm_topk_prob`` is ignored; renormalising would make it always 1).
- "noisy_topk": Shazeer et al. 2017, ``H(x) = x Wg + N(0, 1) * softplus(x W_noise)`` (times
  ``router_noise_std``) in training, the clean logits in eval; then the "topk" rule on ``H``. With
  softmax + renormalise this is the paper's ``softmax(KeepTopK(H(x), k))``.
- "hash": Roller et al. 2021, a fixed random table token id -> K distinct experts (seeded by
  ``hash_seed``), weights 1/K (1.0 for the paper's K = 1); no learned gate, so no logits.
- "sparsemixer": PhiMoE's top-2 (Liu et al. 2024, GRIN / Phi-3.5-MoE) as transformers runs it in
  inference: two rounds of top-1 over the logits. Round one picks the best expert; its weight is
  its softmax probability among the experts whose logit is within a relative ``2 * eps`` of the
  best, ``(best - l) / max(|l|, best) <= 2 * eps``. Round two does the same without the first
  expert. The training-time Gumbel sampling and Heun gradient estimator are not reproduced:
  training uses the same deterministic choice, with gradients through the masked softmaxes.
- "expert_choice": Zhou et al. 2022, every expert takes its C best tokens by softmax/sigmoid score,
  C = ceil(T * capacity_factor / E) with ``capacity_factor`` None meaning ``top_k`` (the same
  compute as token-choice top-k). A token gets 0..E experts. NOT CAUSAL: which tokens an expert
  takes depends on every token of the batch, later positions included, so a causal LM trained
  with it sees the future through the router.

Token-choice routers drop assignments past an expert's capacity C = ceil(T * K * cf / E) when
``capacity_factor`` is set (GShard / Switch); a dropped assignment gets weight 0 and no row, so
the token only keeps its residual (and shared experts) for that slot. ``None`` is dropless.

Shapes: T tokens, D width, E routed experts, K slots per token (K = E for expert choice; slot j
holds expert j and ``keep_TK`` says whether that expert took the token), G expert groups, V vocab.
Scores are computed in fp32 whatever the model dtype (router precision matters for stability).
A ``token_mask_T`` (False at padding, e.g. left-padded generation batches) gives padding tokens no
chosen or kept slot: they are not counted, take no capacity and are not picked by expert choice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.config import MoEConfig


class NonCausalRoutingWarning(UserWarning):
    """A router lets a token's output depend on later tokens (expert-choice routing)."""


@dataclass
class Routing:
    """What the router decided for a batch of tokens; losses and statistics read it.

    Two masks, both ``None`` when they would be all True: ``chosen_TK`` marks the slots the router
    chose (only expert choice pads: slot j of a token is expert j, chosen or not); ``keep_TK``
    marks the slots actually computed (chosen and within capacity). Balance losses and the
    aux-free update read the router's choice; ``counts_E`` and the outputs read the kept slots.
    """

    logits_TE: Tensor | None  # logits routed on (fp32; noisy in training for noisy_topk); None: hash
    scores_TE: Tensor | None  # softmax or sigmoid of logits_TE, before any selection bias; None: hash
    idx_TK: Tensor  # expert of each slot (int64), distinct within a token
    weights_TK: Tensor  # gate weight of each slot (fp32); 0 where not kept
    counts_E: Tensor  # kept assignments per expert (int64)
    keep_TK: Tensor | None = None  # False: slot not computed (dropped for capacity, or not chosen)
    chosen_TK: Tensor | None = None  # False: slot is padding, the router did not choose it
    capacity: int | None = None  # per-expert capacity C; None when dropless
    n_seqs: int = 1  # tokens are n_seqs equal-length sequences, batch-major (sequence-wise loss)


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


def topk_route(
    scores_TE: Tensor,
    top_k: int,
    *,
    normalize: bool,
    scaling: float = 1.0,
    bias_E: Tensor | None = None,
    n_group: int = 1,
    topk_group: int = 1,
    group_score: str = "top2_sum",
) -> tuple[Tensor, Tensor]:
    """Token choice: ``(idx_TK, weights_TK)``. ``bias_E`` steers the choice, never the weights."""
    choice_TE = scores_TE if bias_E is None else scores_TE + bias_E
    if n_group > 1:
        inside_TE = group_limited_mask(choice_TE, n_group, topk_group, group_score)
        choice_TE = choice_TE.masked_fill(~inside_TE, float("-inf"))
    idx_TK = choice_TE.topk(top_k, dim=-1).indices
    weights_TK = scores_TE.gather(1, idx_TK)
    if normalize:
        weights_TK = weights_TK / (weights_TK.sum(dim=-1, keepdim=True) + 1e-20)
    return idx_TK, weights_TK * scaling


def sparsemixer_route(logits_TE: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """PhiMoE's inference routing: ``(idx_TK, weights_TK)`` with K = 2, from the raw logits."""
    idx, weights = [], []
    remaining_TE = logits_TE
    for _ in range(2):
        best_T1, idx_T1 = remaining_TE.max(dim=-1, keepdim=True)
        with torch.no_grad():  # relative distance of every logit below the round's best
            far_TE = (best_T1 - logits_TE) / logits_TE.abs().clamp(min=best_T1) > 2 * eps
        probs_TE = remaining_TE.masked_fill(far_TE, float("-inf")).softmax(dim=-1)
        idx.append(idx_T1)
        weights.append(probs_TE.gather(1, idx_T1))
        remaining_TE = remaining_TE.scatter(1, idx_T1, float("-inf"))
    return torch.cat(idx, dim=1), torch.cat(weights, dim=1)


def token_capacity(n_tokens: int, top_k: int, n_experts: int, capacity_factor: float) -> int:
    """GShard / Switch expert capacity ``ceil(T * K * cf / E)``."""
    return math.ceil(n_tokens * top_k * capacity_factor / n_experts)


def capacity_keep(idx_TK: Tensor, n_experts: int, capacity: int) -> Tensor:
    """``keep_TK``: every expert keeps its first ``capacity`` assignments, the rest are dropped.

    Priority is slot-major (every token's first choice before any second choice, as GShard
    prefers top-1), then token order within a slot (Switch). A stable sort ranks each assignment
    among those of its expert in O(N log N) time and O(N) memory (no ``[N, E]`` one-hot cumsum).
    """
    t, k = idx_TK.shape
    flat_N = idx_TK.t().reshape(-1)  # slot-major
    order_N = flat_N.argsort(stable=True)
    counts_E = torch.bincount(flat_N, minlength=n_experts)
    start_E = counts_E.cumsum(0) - counts_E
    rank_sorted_N = torch.arange(flat_N.numel(), device=flat_N.device) - start_E[flat_N[order_N]]
    rank_N = torch.empty_like(rank_sorted_N).scatter_(0, order_N, rank_sorted_N)
    return (rank_N < capacity).view(k, t).t()


def expert_capacity(n_tokens: int, n_experts: int, capacity_factor: float) -> int:
    """Expert choice: each expert takes ``C = ceil(T * cf / E)`` tokens (at most T)."""
    return min(n_tokens, math.ceil(n_tokens * capacity_factor / n_experts))


def expert_choice_route(scores_TE: Tensor, capacity: int, scaling: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
    """Expert choice (Zhou et al. 2022): ``(idx_TE, weights_TE, keep_TE)`` with K = E slots.

    Slot j of every token is expert j; ``keep_TE[t, j]`` says expert j took token t, which it
    does for exactly ``capacity`` tokens: its best by score. The weight is that score (0 if not
    taken). This reads the whole batch at once: it is not causal.
    """
    t, e = scores_TE.shape
    top_CE = scores_TE.topk(capacity, dim=0).indices
    keep_TE = torch.zeros(t, e, dtype=torch.bool, device=scores_TE.device).scatter_(0, top_CE, True)
    idx_TE = torch.arange(e, device=scores_TE.device).expand(t, e)
    weights_TE = scores_TE.masked_fill(~keep_TE, 0.0) * scaling
    return idx_TE, weights_TE, keep_TE


def hash_table(vocab_size: int, n_experts: int, top_k: int, seed: int) -> Tensor:
    """``[V, K]`` int64: K distinct experts per token id, a fixed random draw seeded by ``seed``."""
    g = torch.Generator().manual_seed(seed)
    chunk = 4096  # NOTE: bounds the temporary ``[chunk, E]`` draw for large vocabularies
    rows = [
        torch.rand(min(chunk, vocab_size - s), n_experts, generator=g).argsort(dim=-1)[:, :top_k]
        for s in range(0, vocab_size, chunk)
    ]
    return torch.cat(rows)


class Router(nn.Module):
    """Scores experts and decides the routing of a batch of tokens, as ``cfg.router`` says.

    ``vocab_size`` is needed only by hash routing (the size of its token id -> expert table).
    """

    def __init__(self, cfg: MoEConfig, d_model: int, vocab_size: int | None = None):
        super().__init__()
        self.cfg = cfg
        self.n_experts, self.top_k = cfg.n_routed_experts, cfg.top_k
        self.gate: nn.Linear | None = None
        self.noise: nn.Linear | None = None
        self.selection_bias: Tensor | None
        self.hash_table: Tensor | None
        if cfg.router == "hash":
            if vocab_size is None:
                raise ValueError("hash routing needs vocab_size (the size of its token id -> expert table)")
            self.vocab_size = vocab_size
            self.register_buffer("hash_table", hash_table(vocab_size, self.n_experts, self.top_k, cfg.hash_seed))
        else:
            self.hash_table = None
            self.gate = nn.Linear(d_model, cfg.n_routed_experts, bias=cfg.router_bias)
        if cfg.router == "noisy_topk":
            self.noise = nn.Linear(d_model, cfg.n_routed_experts, bias=False)
        if cfg.uses_selection_bias:
            # Steers which experts are chosen, never the gate weights (auxiliary-loss-free
            # balancing, Wang et al. 2024); updated outside forward, saved with the model.
            self.register_buffer("selection_bias", torch.zeros(cfg.n_routed_experts))
        else:
            self.selection_bias = None

    @torch.no_grad()
    def reset_buffers(self) -> None:
        """Re-create the buffers' initial values (after ``to_empty`` from the meta device)."""
        if self.selection_bias is not None:
            self.selection_bias.zero_()
        if self.hash_table is not None:
            self.hash_table.copy_(hash_table(self.vocab_size, self.n_experts, self.top_k, self.cfg.hash_seed))

    def forward(self, x_TD: Tensor, token_ids_T: Tensor | None = None, token_mask_T: Tensor | None = None) -> Routing:
        cfg = self.cfg
        if cfg.router == "hash":
            if token_ids_T is None:
                raise ValueError("hash routing needs the token ids: call MoE(x, token_ids=input_ids)")
            assert self.hash_table is not None
            idx_TK = self.hash_table[token_ids_T.reshape(-1)]
            weights_TK = torch.full(idx_TK.shape, 1.0 / self.top_k, device=idx_TK.device)
            return self._token_choice(None, None, idx_TK, weights_TK, token_mask_T)
        assert self.gate is not None
        bias = None if self.gate.bias is None else self.gate.bias.float()
        logits_TE = F.linear(x_TD.float(), self.gate.weight.float(), bias)
        if self.noise is not None and self.training and cfg.router_noise_std > 0:
            noise_std_TE = F.softplus(F.linear(x_TD.float(), self.noise.weight.float()))
            logits_TE = logits_TE + torch.randn_like(logits_TE) * noise_std_TE * cfg.router_noise_std
        if cfg.score_func == "softmax":
            scores_TE = logits_TE.softmax(dim=-1)
        else:
            scores_TE = logits_TE.sigmoid()
        if cfg.router == "expert_choice":
            cf = cfg.capacity_factor if cfg.capacity_factor is not None else cfg.top_k
            n_real = x_TD.shape[0] if token_mask_T is None else int(token_mask_T.sum())
            capacity = expert_capacity(n_real, self.n_experts, cf)
            pick_TE = scores_TE if token_mask_T is None else scores_TE.masked_fill(~token_mask_T[:, None], -1.0)
            idx_TE, weights_TE, keep_TE = expert_choice_route(pick_TE, capacity, cfg.routed_scaling_factor)
            if token_mask_T is not None:  # scores are >= 0, so padding is picked only past the real tokens
                keep_TE = keep_TE & token_mask_T[:, None]
                weights_TE = weights_TE * keep_TE
            counts_E = keep_TE.sum(dim=0)
            return Routing(logits_TE, scores_TE, idx_TE, weights_TE, counts_E, keep_TE, keep_TE, capacity)
        if cfg.router == "sparsemixer":
            idx_TK, weights_TK = sparsemixer_route(logits_TE, cfg.sparsemixer_eps)
            return self._token_choice(
                logits_TE, scores_TE, idx_TK, weights_TK * cfg.routed_scaling_factor, token_mask_T
            )
        idx_TK, weights_TK = topk_route(
            scores_TE,
            self.top_k,
            normalize=cfg.norm_topk_prob and cfg.router != "switch",
            scaling=cfg.routed_scaling_factor,
            bias_E=self.selection_bias,
            n_group=cfg.n_group,
            topk_group=cfg.topk_group,
            group_score=cfg.group_score,
        )
        return self._token_choice(logits_TE, scores_TE, idx_TK, weights_TK, token_mask_T)

    def _token_choice(
        self,
        logits_TE: Tensor | None,
        scores_TE: Tensor | None,
        idx_TK: Tensor,
        weights_TK: Tensor,
        token_mask_T: Tensor | None = None,
    ) -> Routing:
        """Apply the capacity limit, if any, and count each expert's kept assignments."""
        real_TK = None if token_mask_T is None else token_mask_T[:, None].expand_as(idx_TK)
        if self.cfg.capacity_factor is None:
            if real_TK is None:
                counts_E = torch.bincount(idx_TK.reshape(-1), minlength=self.n_experts)
                return Routing(logits_TE, scores_TE, idx_TK, weights_TK, counts_E)
            counts_E = torch.zeros(self.n_experts, dtype=torch.long, device=idx_TK.device)
            counts_E.scatter_add_(0, idx_TK.reshape(-1), real_TK.reshape(-1).long())
            return Routing(logits_TE, scores_TE, idx_TK, weights_TK * real_TK, counts_E, real_TK, real_TK)
        if real_TK is None:
            capacity = token_capacity(idx_TK.shape[0], self.top_k, self.n_experts, self.cfg.capacity_factor)
            keep_TK = capacity_keep(idx_TK, self.n_experts, capacity)
        else:  # padding goes to a dummy expert E, so it takes no real expert's places
            n_real = int(token_mask_T.sum())
            capacity = token_capacity(n_real, self.top_k, self.n_experts, self.cfg.capacity_factor)
            keep_TK = capacity_keep(idx_TK.masked_fill(~real_TK, self.n_experts), self.n_experts + 1, capacity)
            keep_TK = keep_TK & real_TK
        weights_TK = weights_TK * keep_TK
        counts_E = torch.zeros(self.n_experts, dtype=torch.long, device=idx_TK.device)
        counts_E.scatter_add_(0, idx_TK.reshape(-1), keep_TK.reshape(-1).long())  # no host sync
        return Routing(logits_TE, scores_TE, idx_TK, weights_TK, counts_E, keep_TK, real_TK, capacity)
