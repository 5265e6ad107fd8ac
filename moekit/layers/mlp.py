"""The SwiGLU feed-forward network (Shazeer 2020): dense FFN layers and the fused shared experts.

``w2(silu(w1 x) * w3 x)``; w1 is the gate, w3 the up projection, w2 the down projection.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class FeedForward(nn.Module):
    def __init__(self, d_model: int, ffn_dim: int, bias: bool = False):
        super().__init__()
        self.w1 = nn.Linear(d_model, ffn_dim, bias=bias)
        self.w3 = nn.Linear(d_model, ffn_dim, bias=bias)
        self.w2 = nn.Linear(ffn_dim, d_model, bias=bias)

    def forward(self, x_TD: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x_TD)) * self.w3(x_TD))
