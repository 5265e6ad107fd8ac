"""``moekit bench --decode``: moekit's ``generate`` against transformers' on one checkpoint, and the roofline.

The library (``moekit.decode_bench``) does the timing; this module checks the arguments before any
work, reports progress on stderr, and prints the table (or ``--json``), ``--save`` and ``--plot``.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from moekit.bench_models import DECODE_MODELS, LAYER_ROW, QUICK_DECODE_MODELS
from moekit.cli.bench_output import check_destinations, report_rows
from moekit.decode_bench import DecodeRow, plot_decode, run_decode_bench
from moekit.errors import MoekitError
from moekit.side_by_side import DEFAULT_HF_IMPLS

DECODE_REPEATS = 5
DECODE_NEW_TOKENS = 16


def run_decode(args: argparse.Namespace) -> int:
    models = QUICK_DECODE_MODELS if args.quick else DECODE_MODELS
    if args.model:
        if LAYER_ROW in args.model:
            raise MoekitError(f"--model {LAYER_ROW} is a row of --train; --decode knows {', '.join(models)}")
        models = {name: models[name] for name in args.model}
    batches = args.batch or ([1, 2] if args.quick else [1, 8])
    new_tokens = args.new_tokens or (6 if args.quick else DECODE_NEW_TOKENS)
    if new_tokens < 2:
        raise MoekitError("--new-tokens must be at least 2 (decode speed is timed between new tokens)")
    rounds = args.repeats or (1 if args.quick else DECODE_REPEATS)
    check_destinations(args)
    threads = torch.get_num_threads()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    say = (lambda _label: None) if args.json else (lambda label: print(f"bench --decode: {label}", file=sys.stderr))
    try:
        rows = run_decode_bench(
            models,
            batches,
            new_tokens=new_tokens,
            rounds=rounds,
            hf_impls=args.hf_impl or DEFAULT_HF_IMPLS,
            on_progress=say,
        )
    finally:
        torch.set_num_threads(threads)
    report_rows(rows, args, lambda: _print_decode_table(rows), plot_decode)
    return 0


def _print_decode_table(rows: list[DecodeRow]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False)
    if not console.is_terminal:
        console.width = max(console.width, 200)
    first = rows[0]
    impls = list(first.hf_tok_s)
    table = Table(
        title=f"moekit bench --decode: cpu, float32, torch threads {first.threads}, greedy, {first.prompt_tokens}-token "
        f"prompt, {first.new_tokens} new tokens, median of {first.rounds} interleaved rounds; tokens/s",
        title_justify="left",
    )
    for col in [
        "model",
        "batch",
        "moekit",
        *(f"hf {i}" for i in impls),
        "moekit/hf best",
        "in CPU time",
        "same tokens",
    ]:
        table.add_column(col, justify="left" if col == "model" else "right")
    for col in ["MiB/token", "roofline", "of roofline"]:
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(
            r.model,
            str(r.batch),
            f"{r.moekit_tok_s:,.1f}",
            *(f"{r.hf_tok_s[i]:,.1f}" for i in impls),
            f"{r.ratio_vs_hf:.2f} ({r.hf_best_impl}; rounds {min(r.ratio_rounds):.2f}-{max(r.ratio_rounds):.2f})",
            f"{r.cpu_ratio_vs_hf:.2f}",
            f"{100 * r.same_tokens:.0f}%",
            f"{r.weight_bytes_per_token / 2**20:,.1f}",
            f"{r.roofline_tok_s:,.1f}",
            f"{100 * r.roofline_fraction:.0f}%",
        )
    console.print(table)
    loads = [r.load_avg_1m for r in rows if r.load_avg_1m is not None]
    notes = [
        "Decode tokens/s = batch x (steps - 1) / time between the first and last new token (prefill left out).",
        "In CPU time: moekit / transformers' fastest, both per second of the process's CPU time (waits for a core "
        "left out).",
        "MiB/token: weights one decode step reads / batch: always-active weights (one embedding row) + the distinct "
        "routed experts the step chose (accounting x routing).",
        f"Roofline = read bandwidth / MiB per token; read bandwidth {first.read_gb_s:.1f} GB/s "
        "(median torch.sum over a 512 MiB fp32 tensor, same threads).",
    ]
    if loads:
        notes.append(f"Machine load average while timing: {min(loads):.1f}-{max(loads):.1f} on {os.cpu_count()} CPUs.")
    console.print("\n".join(notes))
