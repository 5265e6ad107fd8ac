"""Training speed: one full training step of moekit against transformers on the same checkpoint, and MFU.

Model rows: a random moekit model is saved as a Hugging Face folder; moekit
(``moekit.interop.pretrained.from_pretrained``) and transformers (``AutoModelForCausalLM``, sdpa
attention) load that same folder. Each side runs the step its users run, on the same batch
(8 x 128 tokens by default), with the same torch threads, interleaved in one process
(``moekit.side_by_side``: rounds in a rotated order, medians, per-round ratios):

- moekit: the training loop's step (``moekit.training.loop``): forward with labels, the balance
  losses the model's config enables (``balance_terms``), ``zero_grad``, backward, global-norm clip,
  the finite check, AdamW from ``build_optimizer``, and the aux-loss-free bias update when enabled;
- transformers: forward with labels (with its router aux loss where moekit has one: Qwen3-MoE),
  ``zero_grad``, backward, ``clip_grad_norm_`` and ``torch.optim.AdamW(fused=True)``, which is what
  its ``Trainer`` uses by default with torch >= 2.8 ("adamw_torch_fused"; max_grad_norm 1.0), with
  the same learning rate, betas, weight decay (matrices only) and clip as moekit. Every experts
  implementation asked for is timed ("eager" and "grouped_mm" by default); the ratio is taken
  against the fastest.

Before timing, both sides compute the language-model loss of the batch with the same weights; they
must agree (fp32: 1e-4 relative; bf16 autocast: 2e-2) or the run stops: the comparison would not
be of the same model.

The layer row: one Qwen3-MoE layer (d 512, 64 experts x 192, top-8, 2048 tokens; weights from one
saved checkpoint, so identical): forward + backward into the input and every weight of moekit's
``MoE`` against transformers' ``Qwen3MoeSparseMoeBlock``; their outputs are checked equal first.

MFU = training FLOPs per token x tokens/s / peak FLOP/s.
- Training FLOPs per token (``moekit.accounting.count_flops``, full-context convention of Kaplan
  et al. 2020 and PaLM, causal masking not discounted) = 3 x forward, forward = 2 x N + A:
  N = matmul weights a token meets (attention projections, routers, shared experts, top_k routed
  experts, dense FFN layers and the LM head; not the input embedding lookup, norms or biases);
  A = 2·L·H·(d_qk + d_v)·S: per layer and head, 2 FLOPs per multiply-add for the scores q·k
  (d_qk each) and the weighted sum of v (d_v each) over all S positions; with d_qk = d_v = hd that
  is 2 x 2 x S x H x hd per layer. So training = 6·N + 6·L·H·(d_qk + d_v)·S.
  The layer row: 6 x (router D·E + top_k x 3·D·F).
- Peak = the FLOP/s of one large square matmul measured here (``moekit.side_by_side.matmul_peak``:
  2048 x 2048 fp32 on a CPU, median of 5, the row's threads; 8192 x 8192 bf16 on CUDA).

On CUDA (when available) the same rows run in bf16 autocast with fp32 weights and optimiser state
(what moekit's training loop and transformers' Trainer with ``bf16=True`` do); MFU there is against
the measured bf16 matmul peak.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

from moekit.accounting import count_flops, count_params
from moekit.balancing import balance_terms, chosen_counts, update_selection_bias
from moekit.bench_models import LAYER_ROW, TRAIN_MODELS, layer_model
from moekit.config import ModelConfig, MoEConfig
from moekit.errors import RunError
from moekit.parallel.state import clip_grad_norm_
from moekit.side_by_side import (
    DEFAULT_HF_IMPLS,
    load_average,
    load_transformers,
    matmul_peak,
    paired_ratios,
    rotated_rounds,
)
from moekit.training.config import RunConfig, TrainConfig
from moekit.training.guard import step_is_finite
from moekit.training.loop import build_optimizer


@dataclass
class TrainRow:
    """One (model or layer, device, threads): step times of each side, ratio, tokens/s and MFU."""

    model: str
    kind: str  # "train_step" (forward + backward + AdamW) | "layer_fwd_bwd" (one MoE layer)
    device: str
    dtype: str  # "float32" | "bf16 autocast"
    threads: int
    batch: int
    seq_len: int
    moekit_ms: float
    hf_ms: dict[str, float]  # per transformers experts implementation
    hf_best_impl: str
    ratio_vs_hf: float  # moekit time / transformers' fastest time (ratio of the medians): < 1 is faster
    ratio_rounds: list[float]  # the same within each round (paired, same conditions)
    moekit_tok_s: float
    hf_tok_s: float  # transformers' fastest
    train_flops_per_token: int
    peak_tflops: float  # the measured matmul peak (same threads, device, dtype)
    moekit_mfu: float
    hf_mfu: float
    loss_moekit: float | None  # step 0 language-model loss of each side (model rows)
    loss_hf: float | None
    max_abs_diff: float  # |loss difference| (model rows) or max |output difference| (layer row)
    total_params: int
    active_params: int
    rounds: int
    load_avg_1m: float | None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def mfu(flops_per_token: float, tokens_per_s: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: the fraction of ``peak_flops`` the model's FLOPs at this speed use."""
    return flops_per_token * tokens_per_s / peak_flops


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> int:
    """6·N_matmul + 6·L·H·(d_qk + d_v)·S (see the module docstring), from ``count_flops``."""
    return count_flops(cfg, seq_len, causal=False).train_per_token


def layer_flops_per_token(moe: MoEConfig, d_model: int) -> int:
    """Forward + backward FLOPs per token of one MoE layer: 6 x (router + top_k SwiGLU experts)."""
    shared = moe.n_shared_experts * (moe.shared_ffn_dim or moe.expert_ffn_dim)
    return 6 * (d_model * moe.n_routed_experts + 3 * d_model * (moe.top_k * moe.expert_ffn_dim + shared))


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _hf_balance(cfg: ModelConfig) -> dict[str, Any]:
    """transformers' router aux loss at moekit's coefficient where moekit trains with one (Qwen3-MoE:
    off in its published config, ``output_router_logits=False``, but the same work as moekit's here)."""
    if cfg.moe is None or cfg.moe.aux_loss_coef == 0:
        return {}
    return {"output_router_logits": True, "router_aux_loss_coef": cfg.moe.aux_loss_coef}


def _moekit_step(model, opt, ids_BT, moe: MoEConfig, clip: float, device: torch.device) -> None:
    """One step of ``moekit.training.loop`` (one process, no logging)."""
    with _autocast(device):
        out = model(ids_BT, labels=ids_BT)
    terms = balance_terms(out.routing, moe)
    aux = sum(terms.values()) if terms else torch.zeros((), device=device)
    opt.zero_grad(set_to_none=True)
    (out.loss + aux).backward()
    norm = clip_grad_norm_(model, clip or math.inf)
    if bool(step_is_finite(out.loss + aux, norm)):
        opt.step()
        if moe.aux_free_rate > 0:
            update_selection_bias(model, [chosen_counts(r)[0] for r in out.routing], moe.aux_free_rate)


def _hf_step(model, opt, ids_BT, clip: float, device: torch.device) -> None:
    """One step as transformers' Trainer takes it (no gradient accumulation, no scaler)."""
    with _autocast(device):
        out = model(input_ids=ids_BT, labels=ids_BT)
    opt.zero_grad(set_to_none=True)
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip or math.inf)
    opt.step()


def _hf_optimizer(model, t: TrainConfig) -> torch.optim.AdamW:
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": t.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), fused=True)


def _time(fn: Callable[[], None], device: torch.device) -> float:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def _interleave(calls, rounds, max_seconds, device, say, label) -> dict[str, list[float]]:
    """Seconds of each call: one warm-up each, then ``rounds`` rotated rounds (stopping after 3
    once ``max_seconds`` have passed)."""
    for name, fn in calls.items():
        say(f"{label}: warm-up {name}")
        _time(fn, device)
    times: dict[str, list[float]] = {name: [] for name in calls}
    start, current = time.perf_counter(), 0
    for r, name in rotated_rounds(list(calls), rounds):
        if r != current:  # a new round: stop here (whole rounds only) once 3 have run past max_seconds
            current = r
            if r >= 3 and time.perf_counter() - start > max_seconds:
                break
        say(f"{label}: round {r + 1}/{rounds} {name}")
        times[name].append(_time(calls[name], device))
    return times


@dataclass
class _Setup:
    """What ``run_train_bench`` times for one thread count on one device."""

    device: torch.device
    threads: int
    peak: float


def run_train_bench(
    models: Iterable[str] = (*TRAIN_MODELS, LAYER_ROW),
    threads: Iterable[int] = (2, 1),
    devices: Iterable[str] = ("cpu",),
    quick: bool = False,
    rounds: int = 5,
    hf_impls: Iterable[str] = DEFAULT_HF_IMPLS,
    max_seconds: float = 60.0,
    on_progress: Callable[[str], None] | None = None,
    seed: int = 0,
) -> list[TrainRow]:
    """Time every model x device (x threads on a CPU); see the module docstring."""
    from moekit.models import MoETransformer

    say = on_progress or (lambda _label: None)
    models, hf_impls, threads = list(models), list(hf_impls), list(threads)
    before = torch.get_num_threads()
    peaks: dict[tuple[str, int], float] = {}
    rows: list[TrainRow] = []
    try:
        for dev_name in devices:
            device = torch.device(dev_name)
            dtype = "bf16 autocast" if device.type == "cuda" else "float32"
            for name in models:
                cfg = layer_model(quick) if name == LAYER_ROW else TRAIN_MODELS[name](quick)
                torch.manual_seed(seed)
                with tempfile.TemporaryDirectory(prefix="moekit-train-bench-") as folder:
                    say(f"{name}: saving a random model as a Hugging Face folder")
                    MoETransformer(cfg).save_pretrained(folder, format="hf")
                    for n_threads in threads if device.type == "cpu" else [torch.get_num_threads()]:
                        torch.set_num_threads(n_threads)
                        key = (str(device), n_threads)
                        if key not in peaks:
                            say(f"measuring the {dtype.split()[0]} matmul peak ({device}, {n_threads} torch threads)")
                            peaks[key] = matmul_peak(
                                device,
                                torch.bfloat16 if device.type == "cuda" else torch.float32,
                                n=1024 if quick and device.type == "cpu" else None,
                            )
                        setup = _Setup(device, n_threads, peaks[key])
                        row = _time_row(name, cfg, folder, setup, quick, rounds, hf_impls, max_seconds, say)
                        row.dtype = dtype
                        rows.append(row)
    finally:
        torch.set_num_threads(before)
    return rows


def _time_row(name, cfg, folder, setup: _Setup, quick, rounds, hf_impls, max_seconds, say) -> TrainRow:
    """One row: both sides loaded from ``folder`` and timed on ``setup``'s device and threads."""
    from moekit.interop.pretrained import from_pretrained

    # NOTE: both models are loaded afresh for every row, so each row starts from the saved
    # checkpoint (a previous row's optimiser steps changed the weights and the routing).
    device = setup.device
    ours = from_pretrained(folder).to(device).train()
    theirs = load_transformers(folder, "bench --train", **_hf_balance(cfg)).to(device).train()
    label = f"{name} {device} {setup.threads} thread{'s' if setup.threads > 1 else ''}"
    if name == LAYER_ROW:
        tokens = 128 if quick else 2048
        return _layer_row(cfg, ours, theirs, tokens, setup, rounds, hf_impls, max_seconds, say, label)
    batch, seq = (2, 32) if quick else (8, 128)
    ids_BT = torch.randint(0, cfg.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(1)).to(device)
    return _model_row(cfg, ours, theirs, ids_BT, setup, rounds, hf_impls, max_seconds, say, label)


def _model_row(cfg, ours, theirs, ids_BT, setup: _Setup, rounds, hf_impls, max_seconds, say, label) -> TrainRow:
    device = setup.device
    run = RunConfig(cfg, TrainConfig(batch_size=ids_BT.shape[0], seq_len=ids_BT.shape[1]))
    tol = 2e-2 if device.type == "cuda" else 1e-4
    with torch.no_grad(), _autocast(device):  # the same loss from the same weights, before any step
        loss_ours = float(ours(ids_BT, labels=ids_BT).loss)
        loss_theirs = float(theirs(input_ids=ids_BT, labels=ids_BT, output_router_logits=False).loss)
    if not math.isclose(loss_ours, loss_theirs, rel_tol=tol):
        raise RunError(
            f"bench --train: {cfg.name}: moekit's loss {loss_ours:.6f} and transformers' {loss_theirs:.6f} differ "
            f"at step 0 (same checkpoint): the two would not train the same model"
        )
    opt_ours = build_optimizer(ours, run)
    opt_theirs = _hf_optimizer(theirs, run.train)
    clip = run.train.grad_clip
    assert cfg.moe is not None
    calls: dict[str, Callable[[], None]] = {
        "moekit": lambda: _moekit_step(ours, opt_ours, ids_BT, cfg.moe, clip, device),
    }
    for impl in hf_impls:
        calls[impl] = _with_impl(theirs, impl, lambda: _hf_step(theirs, opt_theirs, ids_BT, clip, device))
    times = _interleave(calls, rounds, max_seconds, device, say, label)
    flops = train_flops_per_token(cfg, ids_BT.shape[1])
    check = (loss_ours, loss_theirs, abs(loss_ours - loss_theirs))
    return _row(cfg, "train_step", times, tuple(ids_BT.shape), flops, setup, hf_impls, check)


def _with_impl(model, impl: str, fn: Callable[[], None]) -> Callable[[], None]:
    def call() -> None:
        model.set_experts_implementation(impl)
        fn()

    return call


def _layer_row(cfg, ours, theirs, n_tokens, setup: _Setup, rounds, hf_impls, max_seconds, say, label) -> TrainRow:
    device = setup.device
    ffn, block = ours.layers[0].ffn, theirs.model.layers[0].mlp
    gen = torch.Generator().manual_seed(2)
    x_BTD = torch.randn(1, n_tokens, cfg.d_model, generator=gen).to(device).requires_grad_()
    g_BTD = torch.randn(1, n_tokens, cfg.d_model, generator=gen).to(device)
    params = [x_BTD, *ffn.parameters(), *block.parameters()]
    with torch.no_grad(), _autocast(device):
        theirs.set_experts_implementation(hf_impls[0])
        y_BTD = block(x_BTD).float()
        diff = float((ffn(x_BTD)[0].float() - y_BTD).abs().max())
        scale = max(1e-3, float(y_BTD.abs().max()))
    if not diff <= (5e-2 if device.type == "cuda" else 1e-4) * scale:
        raise RunError(f"bench --train: the MoE layers' outputs differ by {diff:.3g} on the same weights")

    def fwd_bwd(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[], None]:
        def call() -> None:
            for p in params:
                p.grad = None  # zero_grad(set_to_none=True), as in a training step
            with _autocast(device):
                y = fn(x_BTD)
            y.backward(g_BTD.to(y.dtype))

        return call

    calls = {"moekit": fwd_bwd(lambda x: ffn(x)[0])}
    for impl in hf_impls:
        calls[impl] = _with_impl(theirs, impl, fwd_bwd(block))
    times = _interleave(calls, rounds, max_seconds, device, say, label)
    assert cfg.moe is not None
    flops = layer_flops_per_token(cfg.moe, cfg.d_model)
    return _row(cfg, "layer_fwd_bwd", times, (1, n_tokens), flops, setup, hf_impls, (None, None, diff))


def _row(cfg, kind, times, shape, flops, setup: _Setup, hf_impls, check) -> TrainRow:
    """The row of ``times`` (seconds per call); ``check`` = (moekit loss, transformers loss, |difference|)."""
    tokens = shape[0] * shape[1]
    med = {k: statistics.median(v) for k, v in times.items()}
    hf = {k: med[k] for k in hf_impls}
    best = min(hf, key=hf.get)
    counts = count_params(cfg)
    ours_tok_s, theirs_tok_s = tokens / med["moekit"], tokens / hf[best]
    return TrainRow(
        model=cfg.name,
        kind=kind,
        device=str(setup.device),
        dtype="float32",
        threads=setup.threads,
        batch=shape[0],
        seq_len=shape[1],
        moekit_ms=1e3 * med["moekit"],
        hf_ms={k: 1e3 * v for k, v in hf.items()},
        hf_best_impl=best,
        ratio_vs_hf=med["moekit"] / hf[best],
        ratio_rounds=paired_ratios(times["moekit"], times[best]),
        moekit_tok_s=ours_tok_s,
        hf_tok_s=theirs_tok_s,
        train_flops_per_token=flops,
        peak_tflops=setup.peak / 1e12,
        moekit_mfu=mfu(flops, ours_tok_s, setup.peak),
        hf_mfu=mfu(flops, theirs_tok_s, setup.peak),
        loss_moekit=check[0],
        loss_hf=check[1],
        max_abs_diff=check[2],
        total_params=counts.total,
        active_params=counts.active,
        rounds=len(times["moekit"]),
        load_avg_1m=load_average(),
    )


__all__ = [
    "TrainRow",
    "layer_flops_per_token",
    "mfu",
    "run_train_bench",
    "train_flops_per_token",
]
