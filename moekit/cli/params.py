"""``moekit params SPEC``: total/active parameters, FLOPs and memory of a model, with the formula.

SPEC is a preset name, a moekit config JSON, a Hugging Face config.json, or a folder holding one
(``moekit.interop.counting.load_counted``: any MoE type transformers knows, and the native
readers of ``moekit.interop.types``). ``--json`` prints ``moekit.accounting.Report.to_dict()``:
``total``, ``active``, ``breakdown`` (per component, ``embedding`` and ``lm_head`` included),
``flops_per_token`` (forward, at ``--seq-len``), ``weights_bytes`` (a dict by dtype: fp32, bf16,
fp8, plus ``--dtype`` if it is another) and ``kv_cache_bytes_per_token`` (at ``--dtype``; null
when the attention layers are unknown). Models with zero-computation experts add ``active_min``
/ ``active_max``; quantised configs add ``quantization`` and ``stored_bytes``.
"""

from __future__ import annotations

import argparse
import json

from moekit.accounting import DTYPE_BYTES, VENDOR_ACTIVE_CONVENTION, Report, account, weights_bytes
from moekit.cli.args import positive_int
from moekit.interop.counting import load_counted


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "params",
        help="total/active parameters, FLOPs and memory of a model",
        description="Analytic parameter, FLOP and memory accounting of a model, with the formula and its numbers.",
    )
    p.add_argument(
        "spec",
        metavar="SPEC",
        help="preset name, moekit config JSON, Hugging Face config.json, or a folder holding one",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    p.add_argument(
        "--seq-len", type=positive_int, default=4096, help="context length for attention FLOPs (default 4096)"
    )
    p.add_argument(
        "--dtype",
        choices=sorted(DTYPE_BYTES),
        default="bf16",
        help="dtype of the KV cache and of the highlighted weight memory (default bf16)",
    )
    p.add_argument(
        "--causal",
        action="store_true",
        help="charge attention over the mean causal context (S+1)/2 instead of the full S",
    )
    p.add_argument(
        "--mtp",
        action="store_true",
        help="count multi-token-prediction modules in the total (vendors publish totals without them)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    model = load_counted(args.spec, include_mtp=args.mtp)
    report = account(model, args.seq_len, kv_dtype=args.dtype, causal=args.causal)
    data = report.to_dict()
    if args.dtype not in data["weights_bytes"]:
        data["weights_bytes"].update(weights_bytes(model, (args.dtype,)))
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        _print_human(report, data, args.dtype, report.max_seq_len)
    return 0


def _human(n: float, unit: str = "") -> str:
    for scale, suffix in ((1e15, "P"), (1e12, "T"), (1e9, "B" if not unit else "G"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{suffix}{unit}"
    return f"{n:g}{unit}"


def _bytes(n: int) -> str:
    for scale, suffix in ((2**40, "TiB"), (2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if n >= scale:
            return f"{n / scale:.2f} {suffix}"
    return f"{n} B"


def _print_human(report: Report, data: dict, dtype: str, max_seq_len: int) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False)
    p, f = report.params, report.flops
    table = Table(title=f"{report.name or 'model'}: parameters", title_justify="left")
    table.add_column("component")
    table.add_column("total", justify="right")
    table.add_column("active", justify="right")
    table.add_column("% of total", justify="right")
    for c in p.components:
        total, active = p.breakdown[c.name], p.active_breakdown[c.name]
        note = " (tied: in embedding)" if c.name == "lm_head" and p.tied_embeddings else ""
        note += " *" if not c.in_total else ""
        share = f"{100 * total / p.total:.1f}" if p.total else "-"
        table.add_row(c.name + note, f"{total:,}", f"{active:,}", share)
    table.add_section()
    uniform = " [dim](uniform routing)[/dim]" if p.active_range else ""
    table.add_row("[bold]all[/bold]", f"[bold]{p.total:,}[/bold]", f"[bold]{p.active:,}[/bold]{uniform}", "100.0")
    console.print(table)
    if "mtp" in p.outside_total:
        console.print(
            "* not in the total: multi-token-prediction modules, left out as published (--mtp adds them)",
            soft_wrap=True,
        )
    if p.active_range is not None:
        lo, hi = p.active_range
        console.print(
            f"zero-computation experts: 'active' assumes uniform routing; it ranges from {_human(lo)} to "
            f"{_human(hi)} with the router's choices (active_min / active_max in --json)"
        )

    summary = Table(show_header=False, title="summary", title_justify="left")
    summary.add_column("what")
    summary.add_column("value", justify="right")
    summary.add_row("total parameters", _human(p.total))
    summary.add_row("active parameters (embedding and head included)", _human(p.active))
    summary.add_row(
        "active without the input embedding (DeepSeek-V2/V3, gpt-oss)", _human(p.active_by("no_input_embedding"))
    )
    summary.add_row("active without embedding and head (non-embedding)", _human(p.active_by("non_embedding")))
    ctx = "causal mean" if f.causal else "full"
    if f.attention_per_token is None:
        ctx = "matmuls only: attention layers not known"
    summary.add_row(f"forward FLOPs / token (S={f.seq_len}, {ctx} attention)", _human(f.forward_per_token, "FLOP"))
    summary.add_row("training FLOPs / token (3 × forward)", _human(f.train_per_token, "FLOP"))
    summary.add_row(f"training FLOPs / {f.seq_len}-token sequence", _human(f.train_per_sequence, "FLOP"))
    for dt, n in data["weights_bytes"].items():
        mark = " *" if dt == dtype else ""
        summary.add_row(f"weights at {dt}{mark}", _bytes(n))
    if report.quantization is not None and report.stored_bytes is not None:
        summary.add_row(f"stored checkpoint ({report.quantization}, scales included)", _bytes(report.stored_bytes))
    kv = report.kv_cache_bytes_per_token
    if kv is None:
        summary.add_row(f"KV cache / token ({dtype})", "n/a (attention layers not known)")
    else:
        summary.add_row(f"KV cache / token ({dtype})", _bytes(kv))
        window = report.kv_cache_window_bytes or 0  # sliding-window layers: a fixed ring, not per token
        if window:
            summary.add_row(f"KV cache of the sliding-window layers ({dtype}, fixed)", _bytes(window))
        summary.add_row(f"KV cache / {max_seq_len}-token sequence ({dtype})", _bytes(kv * max_seq_len + window))
    console.print(summary)
    console.print("[bold]formula[/bold] (numbers filled in)")
    console.print(report.formula, soft_wrap=True)
    conventions = ", ".join(f"{vendor}: {c}" for vendor, c in VENDOR_ACTIVE_CONVENTION.items())
    console.print(f"[dim]published 'active' conventions: {conventions}[/dim]", soft_wrap=True)
