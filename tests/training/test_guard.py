"""moekit.training.guard: what counts as a bad step, and skipping versus stopping."""

from __future__ import annotations

import math

import pytest
import torch

from moekit.training.guard import MAX_CONSECUTIVE_SKIPS, NonFiniteGuard, NonFiniteStop, step_is_finite


@pytest.mark.parametrize(
    "loss, norm, ok",
    [(1.0, 2.0, True), (math.nan, 2.0, False), (1.0, math.inf, False), (-math.inf, 1.0, False), (1.0, math.nan, False)],
)
def test_step_is_finite(loss, norm, ok):
    flag = step_is_finite(torch.tensor(loss), torch.tensor(norm))
    assert flag.dtype == torch.bool and flag.dim() == 0 and bool(flag) is ok


def test_stop_names_the_step_and_the_checkpoint(tmp_path):
    g = NonFiniteGuard()
    with pytest.raises(NonFiniteStop, match=r"step 7: non-finite loss nan, gradient norm inf.*still .*step_0000006"):
        g.bad_step(7, torch.tensor(math.nan), torch.tensor(math.inf), tmp_path / "step_0000006")


def test_skipping_counts_and_gives_up_on_divergence():
    g = NonFiniteGuard(skip=True)
    bad = torch.tensor(math.nan)
    g.bad_step(1, bad, bad, None)
    g.good_step()
    for step in range(2, 2 + MAX_CONSECUTIVE_SKIPS):
        g.bad_step(step, bad, bad, None)
    assert g.skipped == 1 + MAX_CONSECUTIVE_SKIPS
    with pytest.raises(NonFiniteStop, match=f"{MAX_CONSECUTIVE_SKIPS + 1} non-finite steps in a row"):
        g.bad_step(100, bad, bad, None)
