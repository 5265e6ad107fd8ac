"""The ``moekit`` command: a thin argparse front over the library.

Each subcommand lives in its own module exposing ``register(subparsers)``; it parses, calls the
library, prints. User errors (bad config, missing file, ...) end in one line on stderr and exit 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from moekit.errors import MoekitError

# Subcommand modules, in the order --help lists them.
COMMANDS = ["quickstart", "params", "convert", "train", "eval", "generate", "plot", "compare", "bench"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moekit",
        description="Mixture-of-Experts transformer LMs: accounting, training, checkpoints, benchmarks.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(f"moekit.cli.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except MoekitError as e:
        import os

        if os.environ.get("RANK", "0") == "0":  # under torchrun every rank fails alike: rank 0 says why
            print(f"moekit {args.command}: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. `moekit params X --json | head`: the reader left, not an error
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print(f"moekit {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
