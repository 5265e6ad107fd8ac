"""Inference with experts sharded over ranks: forward and generation of a ``load_sharded`` model.

Every rank feeds the SAME tokens and gets the same logits as one process:
- expert tensor parallelism (``Layout(dp=1, etp=N)``, distributed-llama's split) is the natural
  layout for one prompt: each rank holds an ``F/N`` slice of every expert and computes its slice
  of each chosen expert; the slices' partial outputs are summed (one all-reduce per MoE layer);
- expert parallelism (``Layout(dp=N, ep=N)``) holds ``E/N`` whole experts per rank; with the
  same prompt on every rank each expert rank receives every rank's copy of its tokens, so it
  shards memory but repeats the expert work N times (feed each rank its own prompts to use it).
NOTE: attention and everything but the routed experts is replicated: each rank computes it in
full, so the speed-up is at most the experts' share of the work.

``generate`` is ``moekit.models.generation.generate`` with rank 0's chosen tokens broadcast each
step: ranks never disagree on a token (sampling or a last-bit difference in an argmax tie), so
they run the same number of collective steps and stop together.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from moekit.models.generation import generate as _generate
from moekit.models.transformer import MoETransformer
from moekit.parallel.apply import parallel_groups


def broadcast_from_rank0(tokens_B: Tensor) -> Tensor:
    """Rank 0's tokens on every rank (identity in one process)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return tokens_B
    comm = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    t = tokens_B.to(comm, copy=True)
    dist.broadcast(t, src=0)
    return t.to(tokens_B.device)


def generate(model: MoETransformer, input_ids: Tensor, max_new_tokens: int | None = None, **kwargs: Any) -> Tensor:
    """``model.generate`` on every rank of a parallelised model (the same ``input_ids`` on each)."""
    sync = broadcast_from_rank0 if parallel_groups(model) is not None else None
    return _generate(model, input_ids, max_new_tokens, token_sync=sync, **kwargs)


__all__ = ["broadcast_from_rank0", "generate"]
