"""N gloo processes against one process on the same global batch (fp32), for every layout of the
issue: forward outputs, losses, input gradients, every parameter's gradient (relative error
<= 1e-5 per tensor), three optimiser steps, capacity dropping per micro-batch, and zero-token
experts and ranks. ``dist_cases.py`` runs all cases of one world size in one torchrun launch
(the session fixture ``dist_results`` in conftest.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).parent
TOL = 1e-5
NOT_LAYOUTS = ("planned", "train")  # results that are not one layout's case


@pytest.fixture(scope="module")
def results(dist_results) -> dict:
    return dist_results["equivalence"]


def test_layouts_equal_one_process(results):
    expected = {"dp2", "dp2-ep2", "etp2"} if "dp2" in results else {"dp4-ep4", "dp4-ep2", "dp2-etp2-ep2"}
    assert expected <= set(results)
    for name, r in results.items():
        if name.endswith("capacity") or name in NOT_LAYOUTS:
            continue
        assert r["logits"] <= TOL, (name, "logits", r["logits"])
        assert r["input_grad"] <= TOL, (name, "input grad", r["input_grad"])
        bad = {n: e for n, e in r["grads"].items() if not e <= TOL}
        assert not bad, (name, "grads", bad)
        assert r["none_grads"] == [], (name, "parameters without a gradient", r["none_grads"])
        for ref, par in r["losses"]:  # three optimiser steps
            assert abs(par - ref) <= TOL * abs(ref), (name, "losses", r["losses"])
        for ref, par in r["grad_norm"]:
            assert abs(par - ref) <= TOL * ref, (name, "global grad norm", r["grad_norm"])
        # Adam divides by sqrt of tiny second moments, which magnifies 1e-7 gradient differences.
        assert r["params_after"] <= 1e-4, (name, "params after 3 steps", r["params_after"])


def test_all_to_all_bytes_are_the_rows_that_change_rank(results):
    measured = {n: r["a2a_bytes"] for n, r in results.items() if "a2a_bytes" in r}
    assert measured and all(sent == expected > 0 or "zero-token-rank" in n for n, (sent, expected) in measured.items())
    assert all(sent == expected for sent, expected in measured.values()), measured


def test_each_rank_holds_its_share_of_the_experts(results):
    for name, r in results.items():
        if "rank_params" in r:
            held, expected = r["rank_params"]
            assert held == expected, name


def test_zero_token_expert_and_rank(results):
    cases = [n for n in results if "zero-token" in n]
    if "dp2" in results:
        assert sorted(cases) == ["dp2-ep2-zero-token-expert", "dp2-ep2-zero-token-rank"]
    for name in cases:
        assert results[name]["unpicked_grad_max"] == 0.0, name  # present, and exactly zero


def test_capacity_drops_per_micro_batch(results):
    (name,) = [n for n in results if n.endswith("capacity")]
    ranks = results[name]
    assert all(r["same_keep"] for r in ranks), ranks
    assert all(r["logits"] <= TOL for r in ranks), ranks
    assert sum(r["dropped"] for r in ranks) > 0  # the case does drop something


def test_planning_counts_what_each_rank_holds(results):
    """``moekit.planning``'s per-rank (replicated, expert) parameters equal what ``parallelize``
    left on each rank: every tested layout, and more model shapes on the same layouts."""
    cases = {n: r["planned_params"] for n, r in results.items() if n not in NOT_LAYOUTS and "planned_params" in r}
    assert len(cases) == len([n for n in results if not n.endswith("capacity") and n not in NOT_LAYOUTS])
    for name, (held, planned) in cases.items():
        assert held == planned, name
    for rank, shapes in enumerate(results["planned"]):
        assert len(shapes) >= 6, shapes
        bad = {n: hp for n, hp in shapes.items() if hp[0] != hp[1]}
        assert not bad, (rank, bad)


def test_training_failures_and_skips_are_collective(results):
    """Two ranks through ``moekit.training.loop.train`` (``dist_train_cases.py``)."""
    if "dp2" not in results:
        assert "train" not in results  # one world size runs them
        return
    r0, r1 = results["train"]
    # An error on rank 1 alone: it speaks; rank 0 fails silently with its exit code (RunError: 1).
    assert r1["together"] == {**r1["together"], "error": "RunError", "exit_code": 1, "speaks": True}
    assert r0["together"] == {**r0["together"], "error": "OtherRankFailed", "exit_code": 1, "speaks": False}
    assert r0["all_true"] is False and r1["all_true"] is False
    # A NaN loss on rank 1 alone, skipped: both ranks skip that step and finish.
    for r in (r0, r1):
        assert r["nan-skip"]["error"] is None, r["nan-skip"]
        assert (r["nan-skip"]["step"], r["nan-skip"]["skipped"]) == (5, 1)
    assert r0["nan-skip"]["metric_steps"] == [1, 2, 3, 4, 5]  # one writer
    assert r0["nan-skip"]["skipped_steps"] == [0, 0, 1, 1, 1]
    assert r0["nan-skip"]["checkpoints"] == ["step_0000004", "step_0000005"]
    assert r0["nan-skip"]["lock_holder"] == str(r0["pid"])  # rank 0 held the run's lock
    # ... not skipped: both ranks stop at that step with exit 1 before the weights change.
    for r in (r0, r1):
        stop = r["nan-stop"]
        assert (stop["error"], stop["exit_code"], stop["speaks"]) == ("NonFiniteStop", 1, None), stop
        assert stop["message"].startswith("step 3: non-finite loss nan") and "step_0000002" in stop["message"]
    assert r0["nan-stop"]["metric_steps"] == [1, 2] and r0["nan-stop"]["checkpoints"] == ["step_0000002"]
    # A run folder another process is writing: refused on every rank; rank 0 says why, exit 2.
    assert r0["locked"]["error"] == "MoekitError" and r0["locked"]["speaks"] is True
    assert "being written by another moekit process" in r0["locked"]["message"]
    assert (r1["locked"]["error"], r1["locked"]["exit_code"], r1["locked"]["speaks"]) == ("OtherRankFailed", 2, False)
    assert r0["locked"]["entries"] == [".moekit.lock"]  # nothing written
