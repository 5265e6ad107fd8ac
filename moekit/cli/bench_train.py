"""``moekit bench --train``: a full training step of moekit against transformers, tokens/s and MFU.

The library (``moekit.train_bench``) does the timing; this module checks the arguments before any
work, reports progress on stderr, and prints the table (or ``--json``), ``--save`` and ``--plot``.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from moekit.bench_models import LAYER_ROW, TRAIN_MODELS
from moekit.cli.bench_output import check_destinations, report_rows
from moekit.errors import MoekitError
from moekit.files import save_png
from moekit.side_by_side import DEFAULT_HF_IMPLS
from moekit.train_bench import TrainRow, run_train_bench

TRAIN_ROUNDS = 5
TRAIN_MAX_SECONDS = 60.0  # a row stops after 3 rounds once it ran this long
DEFAULT_THREADS = (2, 1)


def devices_for(requested: str) -> tuple[list[str], str | None]:
    """The devices ``--device`` asks for and, when CUDA rows are skipped, the line that says so:
    "auto" = the CPU rows, plus the bf16 CUDA rows when CUDA is available."""
    if requested == "cpu":
        return ["cpu"], None
    if requested == "auto":
        if torch.cuda.is_available():
            return ["cpu", "cuda"], None
        return ["cpu"], "bench --train: no CUDA device here: the bf16 CUDA rows are skipped"
    try:
        device = torch.device(requested)
    except RuntimeError:
        device = None
    if device is None or device.type != "cuda":
        raise MoekitError(f"--device {requested!r}: expected cpu, cuda, cuda:N or auto")
    if not torch.cuda.is_available():
        raise MoekitError(f"--device {requested}: CUDA is not available on this machine")
    return [requested], None


def run_train(args: argparse.Namespace) -> int:
    models = args.model or [*TRAIN_MODELS, LAYER_ROW]
    unknown = [m for m in models if m not in TRAIN_MODELS and m != LAYER_ROW]
    if unknown:
        raise MoekitError(f"--model {unknown[0]}: --train knows {', '.join([*TRAIN_MODELS, LAYER_ROW])}")
    if args.shape:
        raise MoekitError("--shape selects the layer benchmark's shapes; with --train use --model")
    threads = [args.threads] if args.threads else ([1] if args.quick else list(DEFAULT_THREADS))
    rounds = args.repeats or (1 if args.quick else TRAIN_ROUNDS)
    devices, skipped = devices_for(args.device)
    check_destinations(args)
    say = (lambda _label: None) if args.json else (lambda label: print(f"bench --train: {label}", file=sys.stderr))
    if skipped:
        print(skipped, file=sys.stderr)
    rows = run_train_bench(
        models,
        threads=threads,
        devices=devices,
        quick=args.quick,
        rounds=rounds,
        hf_impls=args.hf_impl or DEFAULT_HF_IMPLS,
        max_seconds=args.max_seconds or TRAIN_MAX_SECONDS,
        on_progress=say,
    )
    report_rows(rows, args, lambda: print_train_table(rows, skipped), plot_train)
    return 0


def print_train_table(rows: list[TrainRow], skipped: str | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False)
    if not console.is_terminal:
        console.width = max(console.width, 200)
    impls = list(rows[0].hf_ms)
    table = Table(
        title=f"moekit bench --train: one training step (forward + backward + AdamW) on the same checkpoint, "
        f"median of {max(r.rounds for r in rows)} interleaved rounds",
        title_justify="left",
    )
    columns = ["model", "device", "threads", "tokens", "moekit ms", *(f"hf {i} ms" for i in impls)]
    columns += [
        "moekit/hf (rounds)",
        "moekit tok/s",
        "hf tok/s",
        "peak GFLOP/s",
        "MFU moekit",
        "MFU hf",
        "step-0 check",
    ]
    for col in columns:
        table.add_column(col, justify="left" if col in ("model", "device") else "right")
    for r in rows:
        if r.loss_moekit is not None:
            check = f"{r.loss_moekit:.4f} / {r.loss_hf:.4f}"
        else:
            check = f"output |d| {r.max_abs_diff:.0e}"
        table.add_row(
            r.model if r.kind == "train_step" else f"{r.model} fwd+bwd",
            f"{r.device} {r.dtype}",
            str(r.threads),
            f"{r.batch} x {r.seq_len}",
            f"{r.moekit_ms:,.1f}",
            *(f"{r.hf_ms[i]:,.1f}" for i in impls),
            f"{r.ratio_vs_hf:.2f} ({min(r.ratio_rounds):.2f}-{max(r.ratio_rounds):.2f})",
            f"{r.moekit_tok_s:,.0f}",
            f"{r.hf_tok_s:,.0f}",
            f"{1e3 * r.peak_tflops:,.0f}",
            f"{100 * r.moekit_mfu:.1f}%",
            f"{100 * r.hf_mfu:.1f}%",
            check,
        )
    console.print(table)
    loads = [r.load_avg_1m for r in rows if r.load_avg_1m is not None]
    notes = [
        "moekit/hf = moekit's step time / transformers' fastest experts implementation (< 1: moekit is faster), "
        "medians and the range of the per-round ratios.",
        "MFU = training FLOPs per token x tokens/s / the matmul peak measured here (2048^2 fp32 GEMM on a CPU, "
        "same threads; 8192^2 bf16 on CUDA); training FLOPs per token = 6 x matmul weights a token meets "
        "(no input embedding) + 6 x layers x heads x (d_qk + d_v) x seq (full context); "
        "the layer row: 6 x (router + top_k experts).",
        "step-0 check: both sides' language-model loss of the batch (or the layer's output) before any step.",
    ]
    if loads:
        notes.append(f"Machine load average while timing: {min(loads):.1f}-{max(loads):.1f} on {os.cpu_count()} CPUs.")
    flops = {f"{r.model}: {r.train_flops_per_token / 1e6:,.2f}M": None for r in rows}
    notes.insert(2, "Training FLOPs per token: " + ", ".join(flops) + ".")
    if skipped:
        notes.append("No CUDA device here: the bf16 CUDA rows were skipped.")
    console.print("\n".join(notes))


def plot_train(rows: list[TrainRow], path: str) -> None:
    """Two panels, one group per row: tokens/s of both sides (log) with the ratio, and their MFU."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise MoekitError("--plot needs matplotlib (pip install 'moekit[plot]')") from e
    fig, (ax, ax_mfu) = plt.subplots(1, 2, figsize=(3.0 + 2.4 * len(rows), 4.8))
    xs = list(range(len(rows)))
    labels = [f"{r.model.removesuffix('-like')}\n{r.device} {r.threads}t" for r in rows]
    w = 0.38
    ax.bar([i - w / 2 for i in xs], [r.moekit_tok_s for r in rows], w, label="moekit")
    ax.bar([i + w / 2 for i in xs], [r.hf_tok_s for r in rows], w, label="transformers (fastest experts impl)")
    for i, r in enumerate(rows):
        ax.text(i - w / 2, r.moekit_tok_s, f"{r.ratio_vs_hf:.2f}x", ha="center", va="bottom", fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("tokens/s (log)")
    ax.set_title("training tokens/s; label: moekit time / transformers time", fontsize=9)
    ax_mfu.bar([i - w / 2 for i in xs], [100 * r.moekit_mfu for r in rows], w, label="moekit")
    ax_mfu.bar([i + w / 2 for i in xs], [100 * r.hf_mfu for r in rows], w, label="transformers")
    ax_mfu.set_ylabel("MFU (% of the measured matmul peak)")
    ax_mfu.set_title("MFU = training FLOPs/token x tokens/s / peak", fontsize=9)
    for a in (ax, ax_mfu):
        a.set_xticks(xs, labels, fontsize=7)
        a.legend(fontsize=7)
    fig.tight_layout()
    save_png(fig, path, dpi=120, what="--plot")
    plt.close(fig)
