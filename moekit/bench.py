"""The MoE layer benchmark: moekit's layer vs its plain reference vs the dense FFN of equal FLOPs.

Variants, timed in one process, interleaved:
- "moekit": ``MoE(impl=...)`` ("auto" by default: grouped_mm on CUDA bf16, fused on CPU), the whole
  layer -- router, dispatch, routed experts, combine and shared experts;
- "reference": the same module, same weights and routing, with ``impl="reference"``: the plain
  masked loop over every expert (``moekit.layers.moe.reference_routed``), router included too;
- "dense": a SwiGLU ``FeedForward`` of width ``top_k * expert_ffn_dim + n_shared * shared_ffn_dim``:
  the same matmul FLOPs per token as the MoE's experts (it has no router to pay for).

Passes: "forward" runs under ``torch.no_grad`` (prefill / decode inference); "forward_backward" runs
forward with autograd, then backward of a fixed random output gradient into x and every weight,
``.grad`` reset to None before each call as ``optimizer.zero_grad()`` does.

Timing: one warm-up call per variant, then ``repeats`` rounds that call each variant once, in an
order rotated every round, so slow drifts of a shared machine hit all three alike; medians are
reported. A row stops early once it has 3 rounds and has run for ``max_seconds``.

``full=False`` (the default ``moekit bench``; ``--full`` sets it) leaves out what takes most of the
time and is read least: decode-sized batches (``DECODE_TOKENS`` or fewer) run forward only (decoding
does not backpropagate); the reference is timed in forward passes only (its forward+backward at 64+
experts is 20-130x moekit's: minutes per call at 256 experts), and timed by its warm-up call alone
when that took over ``SLOW_REFERENCE_S``; peak memory is measured for moekit and dense only. The figures the README quotes (moekit / dense, reference / moekit forward, memory / dense)
stay; the reference's forward+backward needs ``--full``.

Memory: one more, untimed call per variant under ``torch.profiler`` with ``profile_memory``, which
records every allocation and free of the torch allocator with its address. The figure is the peak
of tensor bytes live above those live before the call, not counting the parameter gradients the
call leaves behind (they are the size of the weights -- the MoE's are (E / (top_k + shared)) times
the dense FFN's -- and any implementation of the layer must produce them). Memory glibc keeps
cached or maps outside tensors is not counted: this measures what the implementation asks for.
The profiler sees only the calling thread, so this call runs the fused loop in that thread
(``expert_threads(1)``); on N worker threads it holds N - 1 more ``[T, D]`` accumulators
(8 MiB each at 2048 x 1024 fp32) and N - 1 more experts' temporaries.

FLOP rates count the dense-equivalent matmul FLOPs: ``2 * 3 * D * width`` per token forward, 3x that
for forward and backward.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from moekit.config import MoEConfig
from moekit.errors import MoekitError
from moekit.files import save_png
from moekit.layers.experts import expert_threads
from moekit.layers.mlp import FeedForward
from moekit.layers.moe import MoE

PASSES = ("forward", "forward_backward")
VARIANTS = ("moekit", "reference", "dense")
DECODE_TOKENS = 64  # batches this small are decode steps: forward only unless full
SLOW_REFERENCE_S = 1.0  # unless full, a reference call longer than this is timed once


@dataclass(frozen=True)
class BenchShape:
    """One MoE layer to time: a width, an MoE config and the batch sizes (tokens) to time it at."""

    name: str
    d_model: int
    moe: MoEConfig
    tokens: tuple[int, ...]

    @property
    def dense_ffn_dim(self) -> int:
        """Width of the dense SwiGLU FFN with the MoE's FLOPs per token (shared experts included)."""
        shared = self.moe.n_shared_experts * (self.moe.shared_ffn_dim or self.moe.expert_ffn_dim)
        return self.moe.top_k * self.moe.expert_ffn_dim + shared


def _shapes(d_model: int, tokens: tuple[int, ...], widths: tuple[int, int, int], tiny: bool) -> dict[str, BenchShape]:
    e_v3 = 32 if tiny else 256  # DeepSeek-V3: 256 routed experts in 8 groups, top-4 groups, top-8
    return {
        s.name: s
        for s in (
            # Mixtral 8x7B: 8 experts, top-2, softmax over the chosen experts.
            BenchShape(
                "mixtral-like", d_model, MoEConfig(n_routed_experts=8, top_k=2, expert_ffn_dim=widths[0]), tokens
            ),
            # DeepSeekMoE 16B: 64 fine-grained experts, top-6, 2 shared experts, no renormalisation.
            BenchShape(
                "deepseekmoe-like",
                d_model,
                MoEConfig(
                    n_routed_experts=16 if tiny else 64,
                    top_k=4 if tiny else 6,
                    expert_ffn_dim=widths[1],
                    n_shared_experts=2,
                    norm_topk_prob=False,
                ),
                tokens,
            ),
            # DeepSeek-V3: sigmoid scores, group-limited routing, selection bias, scaling 2.5, 1 shared.
            BenchShape(
                "deepseek-v3-like",
                d_model,
                MoEConfig(
                    n_routed_experts=e_v3,
                    top_k=4 if tiny else 8,
                    expert_ffn_dim=widths[2],
                    n_shared_experts=1,
                    score_func="sigmoid",
                    n_group=8,
                    topk_group=4,
                    routed_scaling_factor=2.5,
                    selection_bias=True,
                ),
                tokens,
            ),
        )
    }


# Scaled to a CPU: hidden 1024 and expert widths that keep each shape's dense equivalent near
# 2048 wide (V3's 9 x 128 = 1152), so one forward at 2048 tokens takes a few hundred ms on 2 cores.
# Batches: 2048 tokens (prefill / training) and 64 (decode of 64 sequences).
SHAPES = _shapes(1024, (2048, 64), (1024, 256, 128), tiny=False)
# --quick: the same three architectures at toy size, for smoke tests in seconds.
QUICK_SHAPES = _shapes(64, (128, 8), (64, 16, 16), tiny=True)


@dataclass
class BenchRow:
    """One (shape, tokens, pass): median times, ratios, peak extra memory and FLOP rates."""

    shape: str
    tokens: int
    pass_: str  # "forward" | "forward_backward" (``pass`` in ``to_dict``)
    moekit_ms: float
    reference_ms: float | None  # None: not timed (forward+backward without --full)
    dense_ms: float
    ratio_vs_dense: float  # moekit / dense: lower is better, 1.0 is dense speed
    speedup_vs_reference: float | None  # reference / moekit
    moekit_peak_mib: float | None
    reference_peak_mib: float | None
    dense_peak_mib: float | None
    memory_vs_dense: float | None  # moekit peak / dense peak
    moekit_tflops: float
    dense_tflops: float
    # Weights one forward reads: router, shared experts and every expert with a token (MoE);
    # the whole FFN (dense). At decode sizes these bytes, not FLOPs, set the time.
    moekit_weights_read_mib: float
    dense_weights_mib: float
    repeats: int
    impl: str  # what "moekit" ran ("auto" resolved)
    device: str
    dtype: str
    threads: int
    omp_wait_policy: str  # OMP_WAIT_POLICY at start-up; "passive" avoids spin-waits on a busy machine
    n_experts: int
    top_k: int
    n_shared: int
    expert_ffn_dim: int
    dense_ffn_dim: int
    d_model: int
    load_avg_1m: float | None  # the machine's load while this row ran (timings are wall-clock)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return {("pass" if k == "pass_" else k): v for k, v in d.items()}


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def run_bench(
    shapes: Iterable[BenchShape],
    repeats: int = 10,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    impl: str = "auto",
    passes: Iterable[str] = PASSES,
    max_seconds: float = 60.0,
    measure_memory: bool = True,
    on_row: Callable[[int, int, str], None] | None = None,
    seed: int = 0,
    full: bool = True,
) -> list[BenchRow]:
    """Time every shape x batch size x pass; ``on_row(done, total, label)`` reports progress.
    ``full=False`` leaves out the slow, little-read parts (see the module docstring).

    ``dtype`` defaults to bf16 on CUDA (the grouped_mm path) and fp32 on CPU.
    """
    device = torch.device(device) if device is not None else default_device()
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MoekitError("device cuda requested but CUDA is not available")
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    shapes, passes = list(shapes), list(passes)
    for p in passes:
        if p not in PASSES:
            raise MoekitError(f"unknown pass {p!r}; expected one of {list(PASSES)}")

    def passes_at(n_tokens: int) -> list[str]:
        return passes if full or n_tokens > DECODE_TOKENS else [p for p in passes if p == "forward"]

    total = sum(len(passes_at(t)) for s in shapes for t in s.tokens)
    rows: list[BenchRow] = []
    for shape in shapes:
        torch.manual_seed(seed)
        moe_cfg = dataclasses.replace(shape.moe)
        moe_cfg.validate(n_layers=1)
        moe = MoE(moe_cfg, shape.d_model, impl=impl).to(device=device, dtype=dtype)
        dense = FeedForward(shape.d_model, shape.dense_ffn_dim).to(device=device, dtype=dtype)
        for n_tokens in shape.tokens:
            x = torch.randn(1, n_tokens, shape.d_model, device=device, dtype=dtype)
            grad = torch.randn_like(x)
            for pass_ in passes_at(n_tokens):
                if on_row is not None:
                    on_row(len(rows), total, f"{shape.name} {n_tokens} tokens {pass_}")
                variants = VARIANTS if full or pass_ == "forward" else ("moekit", "dense")
                memory = (VARIANTS if full else ("moekit", "dense")) if measure_memory else ()
                row = _bench_row(shape, moe, dense, impl, x, grad, pass_, repeats, max_seconds, variants, memory, full)
                rows.append(row)
        del moe, dense
    if on_row is not None:
        on_row(total, total, "done")
    return rows


def _variant_calls(
    moe: MoE, dense: nn.Module, impl: str, x: Tensor, grad: Tensor, pass_: str
) -> dict[str, Callable[[], None]]:
    """One no-argument call per variant running ``pass_`` on ``x`` (a leaf that requires grad for
    "forward_backward"); gradients accumulate until ``_reset_grads``."""

    def layer(name: str) -> Callable[[Tensor], Tensor]:
        if name == "dense":
            return dense

        def run_moe(inp: Tensor) -> Tensor:
            moe.impl = impl if name == "moekit" else "reference"
            return moe(inp)[0]

        return run_moe

    def make(name: str) -> Callable[[], None]:
        fn = layer(name)
        if pass_ == "forward":

            def call() -> None:
                with torch.no_grad():
                    fn(x)

        else:

            def call() -> None:
                fn(x).backward(grad)

        return call

    return {name: make(name) for name in VARIANTS}


def _bench_row(shape, moe, dense, impl, x, grad, pass_, repeats, max_seconds, variants, memory, full) -> BenchRow:
    """One row: ``variants`` timed, the peak memory of those in ``memory``."""
    if pass_ == "forward_backward":
        x = x.detach().requires_grad_()
    calls = {k: v for k, v in _variant_calls(moe, dense, impl, x, grad, pass_).items() if k in variants}
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    params = [*moe.parameters(), *dense.parameters(), x]
    times: dict[str, list[float]] = {name: [] for name in calls}
    once: set[str] = set()  # timed by their warm-up call alone
    for name, call in calls.items():  # warm-up: first-call allocations, lazy init, cache fill
        _reset_grads(params)
        sync()
        t0 = time.perf_counter()
        call()
        sync()
        seconds = time.perf_counter() - t0
        # NOTE: a reference call this long (seconds, against milliseconds of first-call costs) is
        # timed once, by its warm-up, unless full: its 4-130x ratio to moekit needs no median.
        if name == "reference" and not full and seconds > SLOW_REFERENCE_S:
            times[name].append(seconds)
            once.add(name)
    start = time.perf_counter()
    for r in range(repeats):
        names = list(calls)[r % len(calls) :] + list(calls)[: r % len(calls)]
        for name in names:
            if name in once:
                continue
            # NOTE: freeing the previous call's gradients (zero_grad) is left out of the timing;
            # allocating this call's (the MoE's are E / (top_k + shared) x the dense FFN's) is in.
            _reset_grads(params)
            sync()
            t0 = time.perf_counter()
            calls[name]()
            sync()
            times[name].append(time.perf_counter() - t0)
        if r + 1 >= min(3, repeats) and time.perf_counter() - start > max_seconds:
            break
    ms = {name: 1e3 * statistics.median(ts) for name, ts in times.items()}
    peaks: dict[str, float | None] = {name: None for name in VARIANTS}
    if memory:
        gc.collect()  # nothing of the timed calls may linger into the baseline
        for name, call in calls.items():
            if name not in memory:
                continue
            _reset_grads(params)
            with expert_threads(1):  # the profiler sees the calling thread's allocations only
                peak = peak_extra_bytes(call, params, x.device)
            peaks[name] = None if peak is None else peak / 2**20
    moe.impl = impl
    with torch.no_grad():
        touched = int((moe.router(x.reshape(-1, x.shape[-1])).counts_E > 0).sum())
    item = x.element_size()
    shared = sum(p.numel() for p in moe.shared_experts.parameters()) if moe.shared_experts is not None else 0
    per_expert = 3 * shape.d_model * shape.moe.expert_ffn_dim
    moe_read = (touched * per_expert + shared + moe.router.gate.weight.numel()) * item
    flops = 2 * 3 * shape.d_model * shape.dense_ffn_dim * x.shape[-2] * (3 if pass_ == "forward_backward" else 1)
    mem_ratio = None
    if peaks["moekit"] is not None and peaks["dense"]:
        mem_ratio = peaks["moekit"] / peaks["dense"]
    return BenchRow(
        shape=shape.name,
        tokens=x.shape[-2],
        pass_=pass_,
        moekit_ms=ms["moekit"],
        reference_ms=ms.get("reference"),
        dense_ms=ms["dense"],
        ratio_vs_dense=ms["moekit"] / ms["dense"],
        speedup_vs_reference=ms["reference"] / ms["moekit"] if "reference" in ms else None,
        moekit_peak_mib=peaks["moekit"],
        reference_peak_mib=peaks["reference"],
        dense_peak_mib=peaks["dense"],
        memory_vs_dense=mem_ratio,
        moekit_tflops=flops / ms["moekit"] / 1e9,
        dense_tflops=flops / ms["dense"] / 1e9,
        moekit_weights_read_mib=moe_read / 2**20,
        dense_weights_mib=sum(p.numel() for p in dense.parameters()) * item / 2**20,
        repeats=len(times["moekit"]),
        impl=moe.experts.resolved_impl(x),
        device=str(x.device),
        dtype=str(x.dtype).removeprefix("torch."),
        threads=torch.get_num_threads(),
        omp_wait_policy=os.environ.get("OMP_WAIT_POLICY", "default").lower(),
        n_experts=shape.moe.n_routed_experts,
        top_k=shape.moe.top_k,
        n_shared=shape.moe.n_shared_experts,
        expert_ffn_dim=shape.moe.expert_ffn_dim,
        dense_ffn_dim=shape.dense_ffn_dim,
        d_model=shape.d_model,
        load_avg_1m=os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    )


def _reset_grads(params: list[Tensor]) -> None:
    """``zero_grad(set_to_none=True)`` for ``params`` (the bench input among them)."""
    for p in params:
        p.grad = None


def peak_extra_bytes(call: Callable[[], None], params: list[Tensor], device: torch.device) -> int | None:
    """Peak tensor bytes on ``device`` live during ``call()`` above those live before it, not
    counting parameter gradients still held afterwards; None if the profiler cannot tell."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with _quiet_stderr(), profile(activities=activities, profile_memory=True) as prof:
        call()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    try:
        roots = prof.profiler.kineto_results.experimental_event_tree()
    except (AttributeError, RuntimeError):
        return None
    events: list[tuple[int, int, int]] = []  # (time, address, +bytes allocated / -bytes freed)
    stack = list(roots)
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        fields = node.extra_fields
        if type(fields).__name__ == "_ExtraFields_Allocation" and fields.device.type == device.type:
            events.append((node.start_time_ns, fields.ptr, fields.alloc_size))
    events.sort(key=lambda e: e[0])
    # The allocation behind each gradient still held is the last one at its address.
    grads = {p.grad.data_ptr() for p in params if p.grad is not None}
    last_alloc: dict[int, int] = {}
    for i, (_, ptr, size) in enumerate(events):
        if size > 0:
            last_alloc[ptr] = i
    skip = {last_alloc[ptr] for ptr in grads if ptr in last_alloc}
    live = peak = 0
    for i, (_, _, size) in enumerate(events):
        if i not in skip:
            live += size
            peak = max(peak, live)
    return peak


@contextlib.contextmanager
def _quiet_stderr():
    """Silence file descriptor 2: kineto prints a line there at every profiler start and stop."""
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # no real stderr (e.g. captured): nothing to silence
        yield
        return
    sys.stderr.flush()
    saved, devnull = os.dup(fd), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    try:
        yield
    finally:
        os.dup2(saved, fd)
        os.close(saved)
        os.close(devnull)


def plot_results(rows: list[BenchRow], path: str) -> None:
    """Bar chart of time relative to dense (log scale), one panel per pass; needs matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise MoekitError("--plot needs matplotlib (pip install 'moekit[plot]')") from e
    passes = [p for p in PASSES if any(r.pass_ == p for r in rows)]
    fig, axes = plt.subplots(1, len(passes), figsize=(7 * len(passes), 4.5), squeeze=False)
    for ax, pass_ in zip(axes[0], passes, strict=True):
        sel = [r for r in rows if r.pass_ == pass_]
        labels = [f"{r.shape.removesuffix('-like')}\n{r.tokens} tok" for r in sel]
        xs = range(len(sel))
        w = 0.38
        ax.bar([i - w / 2 for i in xs], [r.ratio_vs_dense for r in sel], w, label="moekit / dense")
        ref = [r.reference_ms / r.dense_ms if r.reference_ms is not None else float("nan") for r in sel]
        ax.bar([i + w / 2 for i in xs], ref, w, label="reference / dense (none: not timed)")
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_yscale("log")
        ax.set_xticks(list(xs), labels, fontsize=7)
        ax.set_title(pass_.replace("_", " + "))
        ax.set_ylabel("time relative to the dense FFN of equal FLOPs")
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_png(fig, path, dpi=120, what="--plot")
    plt.close(fig)


__all__ = [
    "PASSES",
    "QUICK_SHAPES",
    "SHAPES",
    "BenchRow",
    "BenchShape",
    "peak_extra_bytes",
    "plot_results",
    "run_bench",
]
