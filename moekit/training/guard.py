"""Stopping on non-finite numbers: the check of one optimiser step and what to do about a bad one.

A step is good when its loss and its gradient norm are both finite; the loop asks before
``optimizer.step()``, so a bad step never reaches the weights. Then training stops with one line
naming the step (``NonFiniteStop``, exit 1; the newest checkpoint stays the last good one), or,
with ``skip_nonfinite``, the step's update is dropped and counted (as large-scale trainers skip
overflowing steps), up to ``MAX_CONSECUTIVE_SKIPS`` in a row: past that the run has diverged and
skipping would only burn compute.

NOTE: ``step_is_finite`` returns a 0-dim bool tensor, not a Python bool, so a data-parallel loop
can all-reduce it (MIN over ranks) before deciding, and every rank then skips or stops alike.
NOTE: deciding costs one host-device sync per step on a GPU; that is the price of never applying
a bad update (an unchecked step could write NaN into every weight at once).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from moekit.errors import RunError

MAX_CONSECUTIVE_SKIPS = 20


class NonFiniteStop(RunError):
    """Training met a non-finite loss or gradient norm and stopped before updating the weights."""


def step_is_finite(loss: Tensor, grad_norm: Tensor) -> Tensor:
    """True (a 0-dim bool tensor on the loss's device) when the loss and the gradient norm are finite."""
    return torch.isfinite(loss.detach()).all() & torch.isfinite(grad_norm.detach().to(loss.device)).all()


@dataclass
class NonFiniteGuard:
    """Counts bad steps; ``bad_step`` raises ``NonFiniteStop`` unless the step may be skipped."""

    skip: bool = False
    skipped: int = 0  # over the whole run (kept in checkpoints)
    in_a_row: int = 0

    def good_step(self) -> None:
        self.in_a_row = 0

    def bad_step(self, step: int, loss: Tensor, grad_norm: Tensor, checkpoint: Path | None) -> None:
        """Record bad ``step`` (1-based); raise unless skipping is on and it is not one too many."""
        self.skipped += 1
        self.in_a_row += 1
        if self.skip and self.in_a_row <= MAX_CONSECUTIVE_SKIPS:
            return
        newest = f"the newest checkpoint is still {checkpoint}" if checkpoint else "no checkpoint was written"
        numbers = f"loss {float(loss.detach()):g}, gradient norm {float(grad_norm.detach()):g}"
        if self.skip:
            raise NonFiniteStop(
                f"step {step}: {self.in_a_row} non-finite steps in a row ({numbers}); training has diverged and "
                f"stopped before updating the weights; {newest}; lower train.lr"
            )
        raise NonFiniteStop(
            f"step {step}: non-finite {numbers}; training stopped before updating the weights; {newest}; "
            "lower train.lr, or pass --skip-nonfinite to skip such steps"
        )


__all__ = ["MAX_CONSECUTIVE_SKIPS", "NonFiniteGuard", "NonFiniteStop", "step_is_finite"]
