"""Memory per device and communication per step of one layout, in bytes.

Memory per device, at ``dtype`` (fp32, bf16, fp16; fp8 for inference only):
- weights = per-rank parameters (``moekit.planning.layout``) × bytes(dtype).
- training, the regime: fp32 → fp32 weights, fp32 gradients, AdamW m and v in fp32 (4+4+8 =
  16 B/param); bf16/fp16 → half-precision weights and gradients, an fp32 master copy and fp32
  AdamW moments (2+2+4+8 = 16 B/param, the ZeRO paper's mixed-precision Adam). moekit's own loop
  keeps fp32 weights under bf16 autocast on CUDA, whose weight-cast cache adds 2 B/param.
  Activations: ``moekit.planning.activations`` at micro_batch × seq_len tokens per rank.
- inference: weights + KV cache (``kv_cache_bytes_per_token`` at dtype, MLA's compressed latent
  where the model has it, × micro_batch × seq_len, on every rank: attention is replicated) + the
  working set of a prefill of those tokens (``inference_bytes_per_token``: the residual stream
  and the largest of one attention, one FFN / MoE, or the logits).
- ``recompute``: full activation recomputation (moekit does NOT do it): the layer inputs kept and
  one layer's activations at a time (``recomputed_activation_bytes``); its MoE layers' forward
  exchanges run again in backward (3 passes instead of 2).
- ``zero3``: ZeRO-3 / FSDP on top of the layout (moekit's parallel code does NOT run it yet):
  every state of the replicated part sharded over dp, of the experts over their dp/ep replicas,
  plus two gathered units (the layer computing and the one prefetched).

Communication, bytes one rank sends per step (one forward, + backward when training):
- all-to-all (EP): each MoE layer sends every token's K rows of D values to their experts' ranks
  (dispatch) and back (combine); with uniform routing (ep − 1)/ep of the rows leave the rank:
  tokens × n_moe × 2·K·D·b × (ep − 1)/ep, × 2 when training (backward repeats both). The etp ranks
  of a group each run the same exchange (duplicated traffic).
- ETP all-reduce: each MoE layer's output [tokens, D] summed over the etp group; a ring all-reduce
  sends 2(n − 1)/n of the buffer: tokens × n_moe × D·b × 2(etp − 1)/etp, × 2 when training (the
  input gradient is all-reduced too).
- gradient sync (training): ring all-reduce of the gradients at the weight dtype, the replicated
  part over dp and the experts over their dp/ep replicas; ZeRO-3 instead all-gathers the weights
  twice and reduce-scatters the gradients (1.5× the bytes).
- ``comm_per_token`` = all ranks' bytes / tokens the step trains or serves (dp × micro_batch ×
  seq_len): it charges the etp groups' duplicated work fairly against dp.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Literal

from moekit.accounting import DTYPE_BYTES, kv_cache_bytes_per_token
from moekit.config import ConfigError, ModelConfig
from moekit.parallel.layout import Layout
from moekit.planning.activations import (
    F32,
    AttentionKernel,
    ExpertsImpl,
    estimate_activations,
    inference_bytes_per_token,
    recomputed_activation_bytes,
)
from moekit.planning.layout import ParamSplit, rank_parameter_split

Mode = Literal["train", "infer"]
TRAIN_DTYPES = ("fp32", "bf16", "fp16")


@dataclass(frozen=True)
class PlanRequest:
    """What to plan for: ``devices`` of ``device_memory`` bytes, training or inference."""

    devices: int
    device_memory: int
    mode: Mode = "train"
    dtype: str = "bf16"
    micro_batch: int = 1
    seq_len: int = 4096
    headroom: float = 0.1  # fraction of device memory kept free (allocator fragmentation, buffers)
    zero3: bool = False
    recompute: bool = False  # full activation recomputation (training; moekit does not do it)
    experts_impl: ExpertsImpl = "rows"
    attention_kernel: AttentionKernel = "flash"

    def __post_init__(self) -> None:
        for name in ("devices", "device_memory", "micro_batch", "seq_len"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name} must be a positive integer, got {v!r}")
        if self.mode not in ("train", "infer"):
            raise ConfigError(f"mode must be 'train' or 'infer', got {self.mode!r}")
        allowed = TRAIN_DTYPES if self.mode == "train" else tuple(DTYPE_BYTES)
        if self.dtype not in allowed:
            raise ConfigError(
                f"dtype {self.dtype!r} cannot be used to {self.mode}; expected one of {', '.join(allowed)}"
            )
        if self.recompute and self.mode != "train":
            raise ConfigError("recompute applies to training only (inference keeps no activations)")
        if not 0 <= self.headroom < 1:
            raise ConfigError(f"headroom must be a fraction in [0, 1), got {self.headroom!r}")

    @property
    def tokens(self) -> int:
        """Tokens one rank processes per step."""
        return self.micro_batch * self.seq_len


@dataclass
class LayoutCost:
    """One layout's per-device memory and per-step communication, all in bytes."""

    layout: Layout
    experts_per_rank: int
    params_per_rank: int
    memory: dict[str, int]  # weights, gradients, optimizer, activations, kv_cache, gathered
    total: int
    fits: bool  # within (1 - headroom) of the device memory
    fits_without_headroom: bool
    comm: dict[str, int]  # all_to_all, etp_all_reduce, grad_sync: bytes one rank sends per step
    comm_per_step: int
    comm_per_token: float  # all ranks' bytes / tokens the step trains or serves
    per_token_per_moe_layer: dict[str, float]  # dispatch, combine, etp_all_reduce: bytes, forward
    zero3: bool = False

    def to_dict(self) -> dict:
        d = asdict(self)
        d["layout"] = {**asdict(self.layout), "world": self.layout.world_size, "name": self.layout.text()}
        return d


def _ring(n: int) -> float:
    """Share of a buffer each rank sends in a ring all-reduce over ``n`` ranks."""
    return 2 * (n - 1) / n


def layout_cost(cfg: ModelConfig, req: PlanRequest, layout: Layout, split: ParamSplit | None = None) -> LayoutCost:
    """Memory per device and communication per step of ``cfg`` under ``layout`` (module docstring)."""
    split = split or ParamSplit.from_config(cfg)
    repl, experts = rank_parameter_split(split, layout)
    b = DTYPE_BYTES[req.dtype]
    train = req.mode == "train"
    replicas = layout.dp // layout.ep  # ranks holding the same expert slice
    # ZeRO-3 shards every state of the replicated part over dp and of the experts over their replicas.
    held = repl / layout.dp + experts / replicas if req.zero3 else repl + experts
    mem: dict[str, float] = {"weights": held * b}
    tokens = req.tokens
    act = estimate_activations(
        cfg, req.dtype, req.seq_len, layout, experts_impl=req.experts_impl, attention_kernel=req.attention_kernel
    )
    if train:
        mem["gradients"] = held * b
        mem["optimizer"] = held * (8 + (F32 if b != F32 else 0))  # AdamW m, v (+ fp32 master copy)
        if req.recompute:
            mem["activations"] = recomputed_activation_bytes(
                cfg,
                req.micro_batch,
                req.seq_len,
                req.dtype,
                layout=layout,
                experts_impl=req.experts_impl,
                attention_kernel=req.attention_kernel,
            )
        else:
            mem["activations"] = act.peak(tokens)
    else:
        mem["kv_cache"] = tokens * kv_cache_bytes_per_token(cfg, req.dtype)
        per_token = inference_bytes_per_token(
            cfg, req.dtype, req.seq_len, layout, experts_impl=req.experts_impl, attention_kernel=req.attention_kernel
        )
        mem["activations"] = tokens * per_token
    if req.zero3:
        # The widest replicated unit gathered whole, twice (computing + prefetching).
        n_layers = max(cfg.n_layers, 1)
        unit = max(cfg.vocab_size * cfg.d_model, (split.replicated - 2 * cfg.vocab_size * cfg.d_model) / n_layers)
        unit += experts / max(split.n_moe_layers, 1) if split.n_moe_layers else 0
        mem["gathered"] = 2 * unit * b
    memory = {k: math.ceil(v) for k, v in mem.items()}
    total = sum(memory.values())

    n_moe, k, d = split.n_moe_layers, (cfg.moe.top_k if cfg.moe else 0), cfg.d_model
    # Backward repeats the exchange and the all-reduce; recomputation repeats the forward's too.
    passes = (3 if req.recompute else 2) if train else 1
    # One token, one MoE layer, one forward: what leaves this rank.
    per_token = {
        "dispatch": k * d * b * (layout.ep - 1) / layout.ep,
        "combine": k * d * b * (layout.ep - 1) / layout.ep,
        "etp_all_reduce": d * b * _ring(layout.etp),
    }
    comm = {
        "all_to_all": tokens * n_moe * (per_token["dispatch"] + per_token["combine"]) * passes,
        "etp_all_reduce": tokens * n_moe * per_token["etp_all_reduce"] * passes,
        "grad_sync": 0.0,
    }
    if train:
        if req.zero3:  # all-gather weights in forward and backward, reduce-scatter gradients
            comm["grad_sync"] = 1.5 * (repl * b * _ring(layout.dp) + experts * b * _ring(replicas))
        else:
            comm["grad_sync"] = repl * b * _ring(layout.dp) + experts * b * _ring(replicas)
    comm_int = {k_: math.ceil(v) for k_, v in comm.items()}
    per_step = sum(comm_int.values())
    usable = req.device_memory * (1 - req.headroom)
    return LayoutCost(
        layout=layout,
        experts_per_rank=split.n_routed_experts // layout.ep if n_moe else 0,
        params_per_rank=repl + experts,
        memory=memory,
        total=total,
        fits=total <= usable,
        fits_without_headroom=total <= req.device_memory,
        comm=comm_int,
        comm_per_step=per_step,
        comm_per_token=per_step * layout.world_size / (layout.dp * tokens),
        per_token_per_moe_layer=per_token,
        zero3=req.zero3,
    )
