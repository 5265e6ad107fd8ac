"""What every ``moekit bench`` mode does with its rows: destinations checked before the timing, then
the table (or ``--json``), ``--save`` and ``--plot``, in the order least likely to lose results."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from typing import Any

from moekit.errors import MoekitError
from moekit.files import check_may_replace_file, write_text


def check_destinations(args: argparse.Namespace) -> None:
    """Refuse ``--save``/``--plot`` paths moekit may not replace, before minutes of timing, not after."""
    if args.save:
        check_may_replace_file(args.save, "--save")
    if args.plot:
        check_may_replace_file(args.plot, "--plot")


def report_rows(
    rows: Sequence[Any],
    args: argparse.Namespace,
    print_table: Callable[[], None],
    plot: Callable[[Sequence[Any], str], None] | None = None,
) -> None:
    """Print the rows (``--json``: as JSON, else ``print_table()``), then write ``--save`` and ``--plot``.
    If ``--save`` fails after a table was printed, the JSON goes to stdout too, so no timing is lost.
    ``plot`` None: the mode draws nothing (it refuses ``--plot`` before timing)."""
    text = json.dumps([r.to_dict() for r in rows], indent=2)
    if args.json:
        print(text, flush=True)
    else:
        print_table()
    if args.save:
        try:
            write_text(args.save, text + "\n", "--save")
        except MoekitError:
            if not args.json:
                print(text, flush=True)  # the rows survive on stdout
            raise
        if not args.json:
            print(f"Rows written to {args.save}.")
    if args.plot and plot is not None:
        plot(rows, args.plot)
        if not args.json:
            print(f"Plot written to {args.plot}.")
