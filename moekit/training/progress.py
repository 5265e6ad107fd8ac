"""Training progress on stderr: step, loss, tokens/s and ETA.

On a terminal, a rich progress bar. Anywhere else (nohup, a batch scheduler's log, a pipe) a bar
would print nothing until the end, so ``RichProgress`` writes a plain line instead: at the start,
then at most every ``LINE_EVERY_S`` seconds, and at the last step. Given ``log``, the same lines
are also appended to that file (``moekit train`` keeps ``train.log`` in the run directory), with
the bar on a terminal or without any display (``show=False``). ``notes`` (e.g. the threads the
run chose and why) are said once at the start, on the console and in the log; ``watch`` is asked
after every step for a line to say the same way (a change of threads, ``moekit.runtime.LoadWatch``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from moekit.files import write_errors
from moekit.training.loop import TrainCallback

LINE_EVERY_S = 5.0


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class RichProgress(TrainCallback):
    """One bar (or line stream) per run; loss and tokens/s are those of the latest logged step."""

    def __init__(
        self,
        description: str = "train",
        console: Console | None = None,
        log: Path | None = None,
        show: bool = True,
        notes: list[str] | None = None,
        watch: Callable[[], str | None] | None = None,
    ):
        self.description = description
        self.notes = list(notes or [])  # said once at the start, e.g. the threads chosen and why
        self.watch = watch  # called after every step; a line it returns is said (e.g. threads changed)
        self.console = console or Console(stderr=True)
        self.log, self.show = log, show
        self._progress: Progress | None = None
        self._task: Any = None
        self.clock = time.monotonic  # replaceable in tests
        self._lines = False  # plain lines on the console

    def on_start(self, step: int, total: int) -> None:
        self._lines = self.show and not self.console.is_terminal
        self._total, self._first, self._loss, self._tps = total, step, "-", "-"
        self._t0 = self._last = self.clock()
        self._print(f"{self.description}: starting at step {step} of {total}")
        for note in self.notes:
            self._say(note)
        if not self.show or self._lines:
            return
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("{task.fields[tps]} tok/s"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=self.console,
        )
        self._progress.start()
        self._task = self._progress.add_task(self.description, total=total, completed=step, loss="-", tps="-")

    def on_step(self, step: int, record: dict[str, Any] | None) -> None:
        if self.watch is not None and (note := self.watch()):
            self._say(note)
        fields = {}
        if record is not None:
            fields = {"loss": f"{record['loss']:.3f}", "tps": f"{record['tokens_per_s']:,.0f}"}
        self._loss, self._tps = fields.get("loss", self._loss), fields.get("tps", self._tps)
        now = self.clock()
        if (self._lines or self.log) and (now - self._last >= LINE_EVERY_S or step >= self._total):
            self._last = now
            elapsed = now - self._t0
            done = step - self._first
            eta = _clock(elapsed / done * (self._total - step)) if done > 0 else "?"
            self._print(
                f"{self.description} step {step}/{self._total} ({step / self._total:.0%}) loss {self._loss} "
                f"{self._tps} tok/s elapsed {_clock(elapsed)} ETA {eta}"
            )
        if self._progress is not None:
            self._progress.update(self._task, completed=step, **fields)

    def _say(self, line: str) -> None:
        """A note: on the console (above the bar, if one shows) and in the log."""
        if self.show and not self._lines:
            self.console.print(line, highlight=False, markup=False, soft_wrap=True)
        self._print(line)

    def _print(self, line: str) -> None:
        if self._lines:
            self.console.print(line, highlight=False, markup=False, soft_wrap=True)
        if self.log is not None:
            with write_errors(self.log, "progress log"), open(self.log, "a") as f:
                f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}\n")

    def on_end(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


__all__ = ["LINE_EVERY_S", "RichProgress"]
