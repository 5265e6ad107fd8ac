"""The MoE block every architecture configures: route -> dispatch -> experts -> combine (+ shared).

Shapes: B batch, T tokens (B*T flattened), D width, E routed experts, K experts per token, N rows
(kept assignments) in expert order.

The dispatcher is a swappable part (``moekit.layers.dispatch``): ``LocalDispatcher`` by default,
replaced by ``moekit.parallel.parallelize`` with the all-to-all one of expert parallelism. The
block itself never asks which process it runs in.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor, nn

from moekit.config import MoEConfig
from moekit.layers.dispatch import LocalDispatcher
from moekit.layers.experts import Experts, _swiglu, clamped_swiglu
from moekit.layers.mlp import FeedForward
from moekit.layers.router import Router, Routing


class MoE(nn.Module):
    """Sparse FFN: routed experts chosen per token, plus always-on shared experts.

    ``impl`` picks the routed-expert computation: "auto" (grouped_mm on CUDA bf16, else fused),
    an ``EXPERT_IMPLS`` name ("fused", "loop", "grouped_mm") or "reference", the plain masked loop
    over all experts kept for checking.
    ``vocab_size`` is needed only by hash routing (its token id -> expert table).
    """

    def __init__(self, cfg: MoEConfig, d_model: int, impl: str = "auto", vocab_size: int | None = None):
        super().__init__()
        self.cfg = cfg
        self.router = Router(cfg, d_model, vocab_size)
        act = None
        if cfg.expert_activation == "clamped_swiglu":
            act = functools.partial(clamped_swiglu, alpha=cfg.swiglu_alpha, limit=cfg.swiglu_limit)
        self.experts = Experts(cfg.n_routed_experts, d_model, cfg.expert_ffn_dim, bias=cfg.expert_bias, activation=act)
        self.dispatcher = LocalDispatcher()
        self.impl = impl
        if cfg.n_shared_experts:
            assert cfg.shared_ffn_dim is not None
            width = cfg.n_shared_experts * cfg.shared_ffn_dim
            self.shared_experts = FeedForward(d_model, width, bias=cfg.shared_expert_bias)
            self.shared_gate = nn.Linear(d_model, 1, bias=False) if cfg.shared_expert_gate else None
        else:
            self.shared_experts = self.shared_gate = None

    @property
    def impl(self) -> str:
        return self._impl

    @impl.setter
    def impl(self, name: str) -> None:
        if name != "reference":
            self.experts.impl = name
        self._impl = name

    def forward(
        self, x_BTD: Tensor, token_ids: Tensor | None = None, token_mask: Tensor | None = None
    ) -> tuple[Tensor, Routing]:
        """``token_ids`` (shaped like ``x`` without D) are read by hash routing only; ``token_mask``
        (same shape, False at padding) keeps padding out of the routed experts and their counts."""
        shape = x_BTD.shape
        x_TD = x_BTD.reshape(-1, shape[-1])
        mask_T = None if token_mask is None else token_mask.reshape(-1)
        routing = self.router(x_TD, None if token_ids is None else token_ids.reshape(-1), mask_T)
        routing.n_seqs = shape[0] if x_BTD.dim() == 3 else 1  # for the sequence-wise balance loss
        if self._impl == "reference":
            y_TD = reference_routed(self.experts, x_TD, routing, self.cfg.scale_expert_input)
        elif self.cfg.scale_expert_input:
            # Llama 4: sum_k expert_k(w_k x): the dispatcher scales the rows going in, combine just sums.
            d = self.dispatcher.dispatch(x_TD, routing, scale_input=True)
            y_TD = self.dispatcher.combine(self.experts(d.x_ND, d.counts_E), d)
        elif self.dispatcher.local and self.experts.resolved_impl(x_TD) == "fused":
            # The local fast path: gather, experts and gate-weighted scatter in one pass, no [N, D] rows.
            y_TD = self.dispatcher.fused(self.experts, x_TD, routing)
        else:
            d = self.dispatcher.dispatch(x_TD, routing)  # rows in expert order (+ all-to-all)
            y_TD = self.dispatcher.combine(self.experts(d.x_ND, d.counts_E), d)
        if self.shared_experts is not None:
            shared_TD = self.shared_experts(x_TD)
            if self.shared_gate is not None:  # Qwen2-MoE
                shared_TD = torch.sigmoid(self.shared_gate(x_TD)) * shared_TD
            y_TD = y_TD + shared_TD
        return y_TD.view(shape), routing


def reference_routed(ex: Experts, x_TD: Tensor, routing: Routing, scale_input: bool = False) -> Tensor:
    """The obviously-correct masked loop over every expert (as many reference codes do).
    ``scale_input``: the gate weight scales the expert's input instead of its output (Llama 4)."""
    out_TD = torch.zeros_like(x_TD)
    keep_TK = routing.keep_TK if routing.keep_TK is not None else torch.ones_like(routing.idx_TK, dtype=torch.bool)
    for e in range(ex.n_experts):
        tok, slot = torch.where((routing.idx_TK == e) & keep_TK)
        if tok.numel() == 0:
            continue
        bias = [None if b is None else b[e] for b in (ex.b1, ex.b3, ex.b2)]
        w = routing.weights_TK[tok, slot, None].to(x_TD.dtype)
        if scale_input:
            out_TD = out_TD.index_add(
                0, tok, _swiglu(x_TD[tok] * w, ex.w1[e], ex.w3[e], ex.w2[e], *bias, act=ex.activation)
            )
            continue
        y = _swiglu(x_TD[tok], ex.w1[e], ex.w3[e], ex.w2[e], *bias, act=ex.activation)
        out_TD = out_TD.index_add(0, tok, y * w)
    return out_TD
