"""The routed experts: SwiGLU FFNs stored as stacked weights, computed on expert-sorted rows.

Shapes: E experts, F expert width, D model width, N rows (assignments) sorted by expert.
Weights: ``w1_EFD`` (gate), ``w3_EFD`` (up), ``w2_EDF`` (down), each like ``nn.Linear.weight``
per expert, so expert parallelism shards dim 0 and checkpoint mapping stacks/splits dim 0.

Implementations (``EXPERT_IMPLS``) share one signature ``(experts, x_ND, counts_E) -> y_ND``:
- "loop": one matmul chain per non-empty expert over its contiguous slice (CPU default);
- "grouped_mm": ``torch._grouped_mm`` over all experts at once, where the build supports it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Experts(nn.Module):
    def __init__(self, n_experts: int, d_model: int, ffn_dim: int, bias: bool = False, impl: str = "loop"):
        super().__init__()
        self.n_experts, self.d_model, self.ffn_dim = n_experts, d_model, ffn_dim
        self.w1 = nn.Parameter(torch.empty(n_experts, ffn_dim, d_model))
        self.w3 = nn.Parameter(torch.empty(n_experts, ffn_dim, d_model))
        self.w2 = nn.Parameter(torch.empty(n_experts, d_model, ffn_dim))
        if bias:  # gpt-oss
            self.b1 = nn.Parameter(torch.zeros(n_experts, ffn_dim))
            self.b3 = nn.Parameter(torch.zeros(n_experts, ffn_dim))
            self.b2 = nn.Parameter(torch.zeros(n_experts, d_model))
        else:
            self.b1 = self.b3 = self.b2 = None
        self.impl = impl
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02) -> None:
        for w in (self.w1, self.w3, self.w2):
            nn.init.normal_(w, std=std)

    def forward(self, x_ND: Tensor, counts_E: Tensor) -> Tensor:
        return EXPERT_IMPLS[self.impl](self, x_ND, counts_E)


def _swiglu(x: Tensor, w1: Tensor, w3: Tensor, w2: Tensor, b1=None, b3=None, b2=None) -> Tensor:
    return F.linear(F.silu(F.linear(x, w1, b1)) * F.linear(x, w3, b3), w2, b2)


def loop_experts(ex: Experts, x_ND: Tensor, counts_E: Tensor) -> Tensor:
    # NOTE: unbind the stacked weights once. Indexing w[e] per expert makes autograd build a
    # zero-filled full-size gradient for every expert (measured: 4.5 s -> 0.6 s fwd+bwd at 64 experts).
    w1s, w3s, w2s = ex.w1.unbind(0), ex.w3.unbind(0), ex.w2.unbind(0)
    b1s, b3s, b2s = (b.unbind(0) if b is not None else [None] * ex.n_experts for b in (ex.b1, ex.b3, ex.b2))
    outs = []
    for e, x_e in enumerate(x_ND.split(counts_E.tolist())):
        if x_e.shape[0] == 0:
            continue  # empty experts cost nothing
        outs.append(_swiglu(x_e, w1s[e], w3s[e], w2s[e], b1s[e], b3s[e], b2s[e]))
    if not outs:
        return x_ND.new_zeros(0, ex.d_model)
    return torch.cat(outs)


def grouped_mm_experts(ex: Experts, x_ND: Tensor, counts_E: Tensor) -> Tensor:
    if ex.b1 is not None:
        raise NotImplementedError("grouped_mm experts do not support expert biases; use impl='loop'")
    offs_E = counts_E.cumsum(0).to(torch.int32)
    h1 = torch._grouped_mm(x_ND, ex.w1.transpose(-1, -2), offs=offs_E)
    h3 = torch._grouped_mm(x_ND, ex.w3.transpose(-1, -2), offs=offs_E)
    return torch._grouped_mm(F.silu(h1) * h3, ex.w2.transpose(-1, -2), offs=offs_E)


EXPERT_IMPLS: dict[str, Callable[[Experts, Tensor, Tensor], Tensor]] = {
    "loop": loop_experts,
    "grouped_mm": grouped_mm_experts,
}
