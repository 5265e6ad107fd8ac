"""``moekit plan SPEC --devices N``: which parallel layouts fit a model, and their memory and traffic.

SPEC is anything ``moekit params`` takes. Every layout (dp, ep, etp) of N devices is costed by
``moekit.planning`` and ranked (fits with headroom, then least communication per token); when none
fits, the suggestions say what would. ``--json`` prints ``moekit.planning.Plan.to_dict()``.
"""

from __future__ import annotations

import argparse
import json
import sys

from moekit.cli.args import positive_int
from moekit.interop.hf_config import load_spec
from moekit.planning import Plan, PlanRequest, gib, normalise_dtype, parse_memory, plan

DEFAULT_ROWS = 12


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "plan",
        help="which parallel layouts fit a model on N devices, with memory and communication",
        description=(
            "Cost every layout (data, expert and expert-tensor parallel degrees) of a model on N devices: "
            "memory per device and communication per step, ranked."
        ),
    )
    p.add_argument("spec", metavar="SPEC", help="preset name, moekit config JSON, Hugging Face config.json, or folder")
    p.add_argument("--devices", type=positive_int, required=True, help="number of devices (ranks)")
    p.add_argument("--device-memory", default="80GiB", help="memory of one device, e.g. 80GiB, 141GB (default 80GiB)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--train", dest="mode", action="store_const", const="train", help="plan training (default)")
    mode.add_argument("--infer", dest="mode", action="store_const", const="infer", help="plan inference")
    p.set_defaults(mode="train")
    p.add_argument("--dp", type=positive_int, help="fix the data-parallel degree")
    p.add_argument("--ep", type=positive_int, help="fix the expert-parallel degree (divides dp and the experts)")
    p.add_argument("--etp", type=positive_int, help="fix the expert-tensor-parallel degree (divides the expert width)")
    p.add_argument("--micro-batch", type=positive_int, default=1, help="sequences per rank per step (default 1)")
    p.add_argument("--seq-len", type=positive_int, default=4096, help="tokens per sequence (default 4096)")
    p.add_argument("--dtype", default="bf16", help="fp32, bf16, fp16 (training and inference) or fp8 (inference)")
    p.add_argument("--headroom", type=float, default=0.1, help="fraction of device memory kept free (default 0.1)")
    p.add_argument(
        "--zero3",
        action="store_true",
        help="also shard the replicated part ZeRO-3/FSDP style (a layout moekit's parallel code does not run yet)",
    )
    p.add_argument(
        "--recompute",
        action="store_true",
        help="training with full activation recomputation (moekit does not do it yet)",
    )
    p.add_argument(
        "--experts-impl",
        choices=["rows", "fused"],
        default="rows",
        help="activations of the expert path: rows (grouped_mm on CUDA, any ep > 1; default) or fused (CPU)",
    )
    p.add_argument("--rows", type=positive_int, default=DEFAULT_ROWS, help=f"layouts shown (default {DEFAULT_ROWS})")
    p.add_argument("--json", action="store_true", help="print one JSON object with every figure")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    cfg = load_spec(args.spec)
    req = PlanRequest(
        devices=args.devices,
        device_memory=parse_memory(args.device_memory),
        mode=args.mode,
        dtype=normalise_dtype(args.dtype),
        micro_batch=args.micro_batch,
        seq_len=args.seq_len,
        headroom=args.headroom,
        zero3=args.zero3,
        recompute=args.recompute,
        experts_impl=args.experts_impl,
    )
    result = plan(cfg, req, dp=args.dp, ep=args.ep, etp=args.etp)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        _print_human(result, args.rows)
    return 0


def _print_human(result: Plan, rows: int) -> None:
    from rich.console import Console
    from rich.table import Table

    # NOTE: a fixed width off a terminal, so piped output and the README keep one row per layout.
    console = Console(highlight=False, width=None if sys.stdout.isatty() else 160)
    req = result.request
    train = req.mode == "train"
    title = (
        f"{result.name}: {'training' if train else 'inference'} on {req.devices} × {gib(req.device_memory)}, "
        f"{req.dtype}, {req.micro_batch}×{req.seq_len} tokens per rank"
        f"{', ZeRO-3 (not run by moekit yet)' if req.zero3 else ''}"
        f"{', recomputation (not done by moekit)' if req.recompute else ''}"
    )
    table = Table(title=title, title_justify="left")
    for name, justify in [
        ("#", "right"),
        ("dp·ep·etp", "left"),
        ("experts", "right"),
        ("params", "right"),
        ("weights", "right"),
        ("grads+optim" if train else "KV cache", "right"),
        ("activations", "right"),
        ("total", "right"),
        ("fits", "left"),
        ("a2a/step", "right"),
        ("ETP AR/step", "right"),
        *([("grad AR/step", "right")] if train else []),
        ("comm/token", "right"),
    ]:
        table.add_column(name, justify=justify)
    for i, c in enumerate(result.layouts[:rows]):
        m = c.memory
        state = m["gradients"] + m["optimizer"] if train else m["kv_cache"]
        fits = "yes" if c.fits else "tight" if c.fits_without_headroom else "no"
        table.add_row(
            str(i + 1),
            f"{c.layout.dp}·{c.layout.ep}·{c.layout.etp}",
            str(c.experts_per_rank),
            f"{c.params_per_rank / 1e9:.2f}B",
            gib(m["weights"] + m.get("gathered", 0)),
            gib(state),
            gib(m["activations"]),
            gib(c.total),
            fits,
            gib(c.comm["all_to_all"]),
            gib(c.comm["etp_all_reduce"]),
            *([gib(c.comm["grad_sync"])] if train else []),
            gib(c.comm_per_token),
        )
    console.print(table)
    hidden = len(result.layouts) - rows
    if hidden > 0:
        console.print(f"[dim]{hidden} more layouts (all ranked in --json, or --rows {len(result.layouts)})[/dim]")
    usable = req.device_memory * (1 - req.headroom)
    if result.fitting:
        best = result.fitting[0]
        console.print(
            f"best: [bold]{best.layout.text()}[/bold], {gib(best.total)} of {gib(usable)} usable per device "
            f"({len(result.fitting)} of {len(result.layouts)} layouts fit with {req.headroom:.0%} headroom)"
        )
    first = result.fitting[0] if result.fitting else result.layouts[0]
    t = first.per_token_per_moe_layer
    if first.experts_per_rank:
        console.print(
            f"per token per MoE layer ({first.layout.text()}, forward): all-to-all dispatch {gib(t['dispatch'])} + "
            f"combine {gib(t['combine'])}, ETP all-reduce {gib(t['etp_all_reduce'])}"
            f"{'; training doubles both (backward)' if train else ''}",
            soft_wrap=True,
        )
    for line in result.suggestions:
        console.print(f"- {line}", soft_wrap=True)
    for line in result.assumptions:
        console.print(f"[dim]{line}[/dim]", soft_wrap=True)
