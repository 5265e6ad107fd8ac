"""``moekit compare --study NAME``: train a study's models on one token budget and tabulate them."""

from __future__ import annotations

import argparse

from moekit.cli.args import positive_int
from moekit.training.compare import CURVES_PNG, RESULTS_JSON, RESULTS_MD, STUDIES, results_table, run_study
from moekit.training.config import parse_assignments
from moekit.training.progress import RichProgress


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "compare",
        help="train several models on one token budget and compare them",
        description="Studies: "
        + "; ".join(f"{name}: {s.title} (default {s.default_steps} steps)" for name, s in STUDIES.items()),
    )
    p.add_argument("--study", required=True, choices=sorted(STUDIES), help="which comparison to run")
    p.add_argument("--steps", type=positive_int, help="training steps per model (default: the study's)")
    p.add_argument("--out", required=True, help="study directory (one run directory per model inside)")
    p.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a setting of every model, e.g. train.batch_size=4 (repeatable)",
    )
    group = p.add_mutually_exclusive_group()
    group.add_argument("--resume", action="store_true", help="continue an interrupted study")
    group.add_argument("--force", action="store_true", help="start over, replacing the runs in --out")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        rows = run_study(
            args.study,
            args.out,
            steps=args.steps,
            overrides=parse_assignments(args.sets),
            resume=args.resume,
            force=args.force,
            device=args.device,
            progress=None if args.quiet else RichProgress,
        )
    except KeyboardInterrupt:
        again = "".join(f" --set {item}" for item in args.sets) + (f" --steps {args.steps}" if args.steps else "")
        print(f"interrupted; continue with: moekit compare --study {args.study}{again} --out {args.out} --resume")
        return 130
    print(results_table(rows))
    print(f"wrote {args.out}/{RESULTS_JSON}, {args.out}/{RESULTS_MD}, {args.out}/{CURVES_PNG}")
    return 0
