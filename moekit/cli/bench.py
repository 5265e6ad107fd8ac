"""``moekit bench``: time the MoE layer against its plain reference and the dense FFN of equal FLOPs.

Shapes: Mixtral-, DeepSeekMoE- and DeepSeek-V3-like layers scaled to a CPU (``moekit.bench.SHAPES``),
each at a prefill-sized (2048 tokens) batch, forward and forward+backward, and a decode-sized (64
tokens) batch, forward; the reference in forward passes (a few minutes in all). ``--full`` adds
forward+backward at 64 tokens and the reference's forward+backward and memory (~20 minutes on 2
cores). The moekit and reference timings include the router. ``--json`` prints a list of
``moekit.bench.BenchRow.to_dict()`` objects: ``shape``, ``tokens``, ``pass``, ``moekit_ms``,
``reference_ms``, ``dense_ms``, ``ratio_vs_dense``, ``speedup_vs_reference``, ``*_peak_mib``,
``memory_vs_dense``, ``*_tflops`` and what ran (impl, device, dtype, threads, widths, load).

``--train`` times a full training step of moekit and transformers on one checkpoint, with tokens/s
and MFU (``moekit.train_bench``, ``moekit.cli.bench_train``).

``--decode`` times whole-model greedy decoding instead (``moekit.decode_bench``): moekit's
``generate`` against transformers' on the same saved checkpoint, at batch 1 and 8, with the
memory-bandwidth roofline; ``--json`` then prints ``DecodeRow.to_dict()`` objects.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from moekit.bench import QUICK_SHAPES, SHAPES, BenchRow, plot_results, run_bench
from moekit.bench_models import DECODE_MODELS, LAYER_ROW
from moekit.cli.args import positive_float, positive_int
from moekit.cli.bench_decode import DECODE_NEW_TOKENS, DECODE_REPEATS, run_decode
from moekit.cli.bench_output import check_destinations, report_rows
from moekit.errors import MoekitError
from moekit.side_by_side import DEFAULT_HF_IMPLS, HF_EXPERT_IMPLS

DEFAULT_REPEATS = 5
FULL_REPEATS = 10
QUICK_REPEATS = 2
DEFAULT_MAX_SECONDS = 10.0
FULL_MAX_SECONDS = 60.0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "bench",
        help="time the MoE layer against its reference and the dense FFN of equal FLOPs",
        description="Time moekit's MoE layer (router included), the plain masked-loop reference and a dense "
        "SwiGLU FFN with the same FLOPs per token, interleaved in one process, forward and forward+backward, "
        "at a prefill (2048 tokens) and a decode (64 tokens) batch; report medians, ratios and peak extra memory.",
    )
    p.add_argument("--json", action="store_true", help="print a JSON list of rows instead of a table")
    p.add_argument("--quick", action="store_true", help="toy-sized shapes and 2 repeats: a smoke test in seconds")
    p.add_argument(
        "--repeats",
        type=positive_int,
        default=None,
        help=f"timed rounds per row (default {DEFAULT_REPEATS}, {FULL_REPEATS} with --full, {QUICK_REPEATS} with --quick; "
        f"--decode: {DECODE_REPEATS}, 1 with --quick; --train: 5, 1 with --quick)",
    )
    p.add_argument("--shape", action="append", choices=list(SHAPES), help="only this shape (repeatable)")
    p.add_argument(
        "--impl",
        default="auto",
        choices=["auto", "fused", "loop", "grouped_mm"],
        help="what the moekit layer runs (default auto: grouped_mm on CUDA bf16, fused elsewhere)",
    )
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: cuda if available)")
    p.add_argument(
        "--max-seconds",
        type=positive_float,
        default=None,
        help=f"stop a row's rounds early once it has 3 and ran this long (default {DEFAULT_MAX_SECONDS:.0f}, "
        f"{FULL_MAX_SECONDS:.0f} with --full)",
    )
    p.add_argument(
        "--full",
        action="store_true",
        help="the whole layer benchmark (~20 min on 2 cores): forward+backward at the decode batch too, the "
        "reference's forward+backward (minutes per call at 256 experts), its peak memory, "
        f"{FULL_REPEATS} rounds per row",
    )
    p.add_argument(
        "--threads",
        type=positive_int,
        default=None,
        help="torch intra-op threads, for every variant alike (default: torch's, usually the core count; "
        "--train: rows at 2 and at 1)",
    )
    p.add_argument("--no-memory", action="store_true", help="skip the (untimed) peak-memory measurement")
    p.add_argument(
        "--decode",
        action="store_true",
        help="time whole-model decoding: moekit vs transformers' generate on one checkpoint, and the "
        "memory-bandwidth roofline (needs moekit[hf]; minutes)",
    )
    p.add_argument(
        "--train",
        action="store_true",
        help="time a full training step (forward + backward + AdamW): moekit vs transformers on one checkpoint, "
        "tokens/s and MFU against the measured matmul peak, at 2 and 1 threads, plus one MoE layer's "
        "forward+backward (needs moekit[hf]; minutes)",
    )
    p.add_argument(
        "--model",
        action="append",
        choices=[*DECODE_MODELS, LAYER_ROW],
        help=f"--decode / --train: only this model (repeatable; default all; {LAYER_ROW}: --train's layer row)",
    )
    p.add_argument(
        "--batch",
        type=positive_int,
        action="append",
        help="--decode: sequences decoded together (repeatable; default 1 and 8)",
    )
    p.add_argument(
        "--new-tokens",
        type=positive_int,
        default=None,
        help=f"--decode: tokens generated per run (default {DECODE_NEW_TOKENS})",
    )
    p.add_argument(
        "--hf-impl",
        action="append",
        choices=list(HF_EXPERT_IMPLS),
        help=f"--decode: transformers experts implementation to time (repeatable; default {' and '.join(DEFAULT_HF_IMPLS)})",
    )
    p.add_argument("--plot", metavar="FILE", help="also write a PNG bar chart of time relative to dense")
    p.add_argument("--save", metavar="FILE", help="also write the --json rows to FILE (written first, before the plot)")
    p.add_argument(
        "--ep",
        type=positive_int,
        help="instead: a training step at 1 and at EP expert-parallel processes (gloo), with per-layer "
        "all-to-all bytes and time",
    )
    p.add_argument(
        "--load-sharded",
        type=positive_int,
        metavar="N",
        help="instead: peak memory of loading a checkpoint in one process vs N processes each loading its shard",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.load_sharded is not None:
        return run_load(args)
    if args.ep is not None:
        return run_ep(args)
    if args.decode and args.train:
        raise MoekitError("--decode and --train are two benchmarks: choose one")
    if args.decode:
        return run_decode(args)
    if args.train:
        from moekit.cli.bench_train import run_train

        return run_train(args)
    shapes = QUICK_SHAPES if args.quick else SHAPES
    selected = [shapes[name] for name in args.shape] if args.shape else list(shapes.values())
    full = args.full or args.quick  # --quick: every part, at toy size
    repeats = args.repeats or (QUICK_REPEATS if args.quick else FULL_REPEATS if args.full else DEFAULT_REPEATS)
    max_seconds = args.max_seconds or (FULL_MAX_SECONDS if full else DEFAULT_MAX_SECONDS)
    device = None if args.device == "auto" else args.device
    try:
        device = torch.device(device) if device is not None else None
    except RuntimeError as e:
        raise MoekitError(f"invalid --device {args.device!r}: {e}") from None
    if device is not None and device.type == "cuda" and not torch.cuda.is_available():
        raise MoekitError(f"--device {args.device}: CUDA is not available on this machine")
    if device is not None and device.type not in ("cpu", "cuda"):
        raise MoekitError(f"--device {args.device}: expected cpu, cuda or cuda:N")
    check_destinations(args)
    threads = torch.get_num_threads()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    progress = _Progress(enabled=not args.json)
    try:
        rows = run_bench(
            selected,
            repeats=repeats,
            device=device,
            impl=args.impl,
            max_seconds=max_seconds,
            measure_memory=not args.no_memory,
            full=full,
            on_row=progress.update,
        )
    finally:
        progress.close()
        torch.set_num_threads(threads)  # main() may run inside a longer-lived process (tests, notebooks)
    report_rows(rows, args, lambda: _print_table(rows), plot_results)
    return 0


class _Progress:
    """Progress on stderr (hidden with --json so stdout stays machine-readable): a rich bar on a
    terminal, one line per row otherwise (a log file)."""

    def __init__(self, enabled: bool):
        from rich.console import Console

        self.enabled = enabled
        self._console = Console(stderr=True)
        self._progress = self._task = None
        if enabled and self._console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._progress = Progress(
                TextColumn("[bold]bench"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("{task.description}"),
                console=self._console,
                transient=True,
            )
            self._progress.start()

    def update(self, done: int, total: int, label: str) -> None:
        if not self.enabled:
            return
        if self._progress is None:
            if done < total:
                print(f"bench [{done + 1}/{total}] {label}", file=sys.stderr, flush=True)
            return
        if self._task is None:
            self._task = self._progress.add_task(label, total=total)
        self._progress.update(self._task, completed=done, description=label)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()


def _mib(v: float | None) -> str:
    return "-" if v is None else f"{v:,.1f}"


def _print_table(rows: list[BenchRow]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False)
    if not console.is_terminal:
        console.width = max(console.width, 200)  # piped or captured: do not squeeze the table
    first = rows[0]
    impls = ", ".join(sorted({r.impl for r in rows}))
    rounds = sorted({r.repeats for r in rows})
    table = Table(
        title=f"moekit bench: {first.device}, {first.dtype}, {first.threads} threads, "
        f"OMP_WAIT_POLICY={first.omp_wait_policy}; moekit impl: {impls}; medians",
        title_justify="left",
    )
    columns = [
        ("shape", "left"),
        ("tokens", "right"),
        ("pass", "left"),
        ("moekit ms", "right"),
        ("ref ms", "right"),
        ("dense ms", "right"),
        ("moekit/dense", "right"),
        ("ref/moekit", "right"),
        ("MiB moekit", "right"),
        ("MiB ref", "right"),
        ("MiB dense", "right"),
        ("mem/dense", "right"),
        ("read MiB moekit/dense", "right"),
        ("TFLOP/s", "right"),
    ]
    if len(rounds) > 1:
        columns.append(("rounds", "right"))
    for col, justify in columns:
        table.add_column(col, justify=justify)
    previous = None
    for r in rows:
        if previous is not None and r.shape != previous:
            table.add_section()
        previous = r.shape
        cells = [
            r.shape,
            str(r.tokens),
            "fwd" if r.pass_ == "forward" else "fwd+bwd",
            f"{r.moekit_ms:,.2f}",
            "-" if r.reference_ms is None else f"{r.reference_ms:,.2f}",
            f"{r.dense_ms:,.2f}",
            f"{r.ratio_vs_dense:.2f}",
            "-" if r.speedup_vs_reference is None else f"{r.speedup_vs_reference:.2f}",
            _mib(r.moekit_peak_mib),
            _mib(r.reference_peak_mib),
            _mib(r.dense_peak_mib),
            "-" if r.memory_vs_dense is None else f"{r.memory_vs_dense:.2f}",
            f"{r.moekit_weights_read_mib:,.0f} / {r.dense_weights_mib:,.0f}",
            f"{r.moekit_tflops:.3f}",
        ]
        if len(rounds) > 1:
            cells.append(str(r.repeats))
        table.add_row(*cells)
    console.print(table)
    loads = [r.load_avg_1m for r in rows if r.load_avg_1m is not None]
    notes = [
        "moekit and reference times include the router; dense is a SwiGLU FFN of width "
        "(top_k + shared) x expert width (same matmul FLOPs per token).",
        "fwd runs under no_grad; fwd+bwd backpropagates into x and every weight.",
        "MiB: peak tensor bytes above those live before the call, parameter gradients excluded "
        "(torch.profiler; fused loop in one thread for this).",
        "read MiB: weights one forward reads (router + shared + experts with a token). "
        "TFLOP/s: dense-equivalent matmul FLOPs / moekit time.",
    ]
    if any(r.reference_ms is None for r in rows):
        notes.append(
            "-: not measured by the default run (the reference's forward+backward, its memory, "
            "forward+backward at the decode batch), which times a reference call over 1 s once; "
            "`moekit bench --full` measures everything, with medians."
        )
    if len(rounds) == 1:
        notes.append(f"{rounds[0]} timed rounds per row.")
    if loads:
        notes.append(f"Machine load average while timing: {min(loads):.1f}-{max(loads):.1f} on {os.cpu_count()} CPUs.")
        busy = max(loads) > (os.cpu_count() or 1)
        if first.device == "cpu" and first.threads > 1 and busy and first.omp_wait_policy != "passive":
            notes.append(
                "The machine is busy: OpenMP threads spin-wait for each other, which costs many-small-op "
                "layers far more than one big matmul; OMP_WAIT_POLICY=passive or --threads 1 give steadier ratios."
            )
    console.print("\n".join(notes))


def run_ep(args: argparse.Namespace) -> int:
    from moekit.parallel.bench import format_report, run_ep_bench

    if args.plot:
        raise MoekitError("--plot draws the layer benchmark; with --ep use --json or --save")
    check_destinations(args)  # before the processes start, not after
    steps = args.repeats or (QUICK_REPEATS if args.quick else 5)
    results = run_ep_bench(args.ep, steps=steps, quick=args.quick, threads=args.threads)
    report_rows(results, args, lambda: print(format_report(results), flush=True))
    return 0


def run_load(args: argparse.Namespace) -> int:
    from moekit.parallel.load_bench import format_report, run_load_bench

    if args.plot:
        raise MoekitError("--plot draws the layer benchmark; with --load-sharded use --json or --save")
    check_destinations(args)  # a file moekit did not write is refused before the processes start
    rows = run_load_bench(args.load_sharded, quick=args.quick)
    report_rows(rows, args, lambda: print(format_report(rows)))
    return 0
