"""A rich progress bar for the training loop: step, loss, tokens/s and ETA, on stderr."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from moekit.training.loop import TrainCallback


class RichProgress(TrainCallback):
    """Shows one bar per run; the loss and tokens/s shown are those of the latest logged step."""

    def __init__(self, description: str = "train", console: Console | None = None):
        self.description = description
        self.console = console or Console(stderr=True)
        self._progress: Progress | None = None
        self._task: Any = None

    def on_start(self, step: int, total: int) -> None:
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
        if self._progress is None:
            return
        fields = {}
        if record is not None:
            fields = {"loss": f"{record['loss']:.3f}", "tps": f"{record['tokens_per_s']:,.0f}"}
        self._progress.update(self._task, completed=step, **fields)

    def on_end(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


__all__ = ["RichProgress"]
