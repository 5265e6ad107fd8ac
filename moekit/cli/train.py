"""``moekit train``: train a model from a preset or config on real text, with checkpoints."""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

from moekit.cli.args import add_threads_option, with_threads
from moekit.config import ConfigError
from moekit.runtime import applied, follow_load
from moekit.training.config import make_run_config, parse_assignments
from moekit.training.distributed import Distributed
from moekit.training.loop import train
from moekit.training.progress import RichProgress
from moekit.training.run_dir import TRAIN_LOG


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train",
        help="train a model on text (default: this Python's standard library sources)",
        description="Train a model into --out: config.json, metrics.jsonl, checkpoints/, summary.json. "
        "Ctrl-C saves a checkpoint; --resume continues it. A NaN/inf loss or gradient stops training (exit 1) "
        "before the weights change. --force replaces only the files of a moekit run, never other files.",
    )
    p.add_argument("--preset", help="model preset, e.g. tiny, tiny-mixtral, tiny-dense (a wrong name lists them all)")
    p.add_argument("--config", help="JSON run config (a run's config.json) or model config")
    p.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. moe.top_k=4 or train.lr=3e-4 (repeatable)",
    )
    p.add_argument("--data", help="a text file or folder of text files (default: the standard library)")
    p.add_argument("--steps", type=int, help="total optimiser steps (with --resume: continue up to this many)")
    p.add_argument("--out", required=True, help="run directory")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    group.add_argument("--force", action="store_true", help="start over, replacing the run in --out")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument(
        "--skip-nonfinite",
        action="store_true",
        help="skip (and count) steps whose loss or gradient norm is NaN/inf instead of stopping (exit 1)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_threads_option(p)
    par = p.add_argument_group(
        "several processes (launch with torchrun --nproc-per-node N -m moekit train ...; no flags: data parallel)"
    )
    par.add_argument("--ep", type=int, help="expert-parallel group size: ranks sharing out the experts (divides N)")
    par.add_argument("--etp", type=int, help="expert tensor-parallel size: ranks slicing each expert's width")
    par.add_argument("--backend", default="auto", help="torch.distributed backend: gloo, nccl or auto (default)")
    p.set_defaults(func=with_threads(run))  # threads chosen before Distributed, which would choose them itself


def run(args: argparse.Namespace) -> int:
    overrides = parse_assignments(args.sets)
    cfg = None  # --resume alone: the run's own config.json
    if args.preset or args.config or not args.resume:
        cfg = make_run_config(args.preset, args.config, overrides, args.data)
    elif overrides or args.data:
        raise ConfigError(
            "--resume without --preset/--config uses the run's own config; --set and --data cannot change it"
        )
    parallel = Distributed(ep=args.ep, etp=args.etp, backend=args.backend)
    if not parallel.is_main:
        warnings.simplefilter("ignore")  # rank 0 alone speaks; the others would repeat it
    try:
        # Rank 0: progress on stderr (unless --quiet) and always in the run's train.log; the others: none.
        progress = (
            RichProgress(
                "train", log=Path(args.out) / TRAIN_LOG, show=not args.quiet, notes=_thread_notes(), watch=follow_load()
            )
            if parallel.is_main
            else None
        )
        result = train(
            cfg,
            args.out,
            resume=args.resume,
            force=args.force,
            steps=args.steps,
            device=args.device,
            callback=progress,
            skip_nonfinite=args.skip_nonfinite,
            parallel=parallel,
        )
    finally:
        parallel.close()
    if not parallel.is_main:
        return 130 if result.interrupted else 0
    if result.interrupted:
        print(
            f"interrupted at step {result.step}; checkpoint {result.checkpoint}\n"
            f"continue with: {parallel.relaunch_prefix()}moekit train --resume --out {args.out}{parallel.flags()}"
            + (" --skip-nonfinite" if args.skip_nonfinite else "")
        )
        return 130
    s = result.summary
    assert s is not None
    train_loss = "-" if s["train_loss"] is None else f"{s['train_loss']:.4f}"  # none logged (resumed at the end)
    skipped = f", {s['skipped_steps']} non-finite steps skipped" if s.get("skipped_steps") else ""
    print(
        f"step {s['steps']}: val loss {s['val_loss']:.4f} (perplexity {s['val_ppl']:.2f}), "
        f"train loss {train_loss}, {s['tokens']:,} tokens in {s['train_time_s']:.0f} s{skipped}"
    )
    print(
        f"params {s['total_params']:,} total, {s['active_params']:,} active; "
        f"{s['flops_per_token']:,} FLOPs/token forward"
    )
    print(f"wrote {result.run_dir}/summary.json, metrics.jsonl, {result.checkpoint}")
    return 0


def _thread_notes() -> list[str]:
    choice = applied()
    return [choice.line] if choice is not None else []
