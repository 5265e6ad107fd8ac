"""``moekit plot DIR``: loss curves and the per-layer expert-load heatmap of a run, as PNGs."""

from __future__ import annotations

import argparse

from moekit.training.plots import plot_run


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("plot", help="loss curves and expert-load heatmap PNGs of a run")
    p.add_argument("run_dir", metavar="DIR", help="a run directory written by `moekit train`")
    p.add_argument("--out", help="folder for the PNGs (default: DIR)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    for path in plot_run(args.run_dir, args.out):
        print(f"wrote {path}")
    return 0
