"""The ``moekit`` command: a thin argparse front over the library.

Each subcommand lives in its own module exposing ``register(subparsers)``; it parses, calls the
library, prints. Every failure ends in one line on stderr, never a traceback:

- exit 2: bad input -- a malformed option (argparse), a ``MoekitError`` (bad config, missing or
  foreign file, refused destination);
- exit 1: the run failed -- a ``RunError`` (non-finite loss, a write the system refused), any other
  ``OSError``, or a moekit bug (then the line says so; ``MOEKIT_TRACEBACK=1`` shows the traceback);
- exit 130: interrupted.

Under torchrun every rank exits with the code, and one rank prints the line: rank 0, or the rank
that failed first in a step the ranks run together (``MoekitError.speaks``).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from moekit import runtime
from moekit.errors import MoekitError

# Subcommand modules, in the order --help lists them.
COMMANDS = [
    "quickstart",
    "params",
    "plan",
    "convert",
    "train",
    "eval",
    "generate",
    "trace",
    "plot",
    "compare",
    "bench",
]


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (what was wrong and where to look), exit 2."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from moekit import __version__

    parser = OneLineParser(
        prog="moekit",
        description="Mixture-of-Experts transformer LMs: accounting, training, checkpoints, benchmarks.",
    )
    parser.add_argument("--version", action="version", version=f"moekit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(f"moekit.cli.{name}").register(sub)
    return parser


def _rank() -> int:
    """This process's rank under torchrun (0 without it)."""
    return int(os.environ.get("RANK", "0") or 0)


def _fail(command: str, message: str, code: int, quiet: bool = False) -> int:
    if not quiet:
        line = " ".join(str(message).split())  # one line, whatever the message held
        where = f" (rank {_rank()})" if _rank() else ""  # an error only a later rank met
        print(f"moekit {command}: error{where}: {line}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    # Before the subcommands import torch: OpenMP reads its wait policy once, when it loads.
    runtime.prepare_openmp(list(sys.argv[1:] if argv is None else argv))
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version (0) or a usage error (2, already printed)
        return e.code if isinstance(e.code, int) else 2
    command = args.command
    try:
        return int(args.func(args) or 0)
    except MoekitError as e:
        speaks = e.speaks if e.speaks is not None else _rank() == 0  # under torchrun: one rank says why
        return _fail(command, str(e), e.exit_code, quiet=not speaks)
    except BrokenPipeError:  # e.g. `moekit params X --json | head`: the reader left, not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        if _rank() == 0:
            print(f"moekit {command}: interrupted", file=sys.stderr)
        return 130
    except OSError as e:  # a file-system fault no writer anticipated: still one line
        where = f" {e.filename}" if e.filename else ""
        return _fail(command, f"{e.strerror or e}:{where}" if where else str(e.strerror or e), 1)
    except Exception as e:  # a bug in moekit: say so in one line; MOEKIT_TRACEBACK=1 shows where
        if os.environ.get("MOEKIT_TRACEBACK"):
            raise
        return _fail(
            command,
            f"internal error {type(e).__name__}: {e} (a moekit bug: please report it; "
            "MOEKIT_TRACEBACK=1 shows the traceback)",
            1,
        )


if __name__ == "__main__":
    sys.exit(main())
