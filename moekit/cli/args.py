"""Argument types shared by the subcommands."""

from __future__ import annotations

import argparse
import functools
import math
from collections.abc import Callable

from moekit.runtime import run_threads


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1, with a message naming what was given."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive, finite number, got {text!r}")
    return value


def add_threads_option(p: argparse.ArgumentParser) -> None:
    """``--threads N``: torch intra-op threads for the run (see ``moekit.runtime``)."""
    p.add_argument(
        "--threads",
        type=positive_int,
        help="torch intra-op threads per process (default: the cores not busy with other work; "
        "MOEKIT_THREADS or OMP_NUM_THREADS also set it)",
    )


def with_threads(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Run a subcommand with the threads ``--threads`` (or the machine) chooses, restored after it;
    the choice and why: ``moekit.runtime.applied()``."""

    @functools.wraps(run)
    def wrapped(args: argparse.Namespace) -> int:
        with run_threads(args.threads):
            return run(args)

    return wrapped
