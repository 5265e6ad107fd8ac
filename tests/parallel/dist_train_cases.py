"""Training-loop cases for ``dist_cases.py``'s launch (no extra spawn): what the run folder's
guarantees become on several ranks, each case's outcome per rank for ``test_equivalence.py``.

- ``together``: an error on rank 1 alone fails every rank; rank 1 speaks, rank 0 exits with its code;
- ``nan-skip`` / ``nan-stop``: a non-finite loss on rank 1 ALONE (an injected NaN balance term; its
  gradients stay finite) is skipped, or stops the run, on every rank at the same step;
- ``locked``: a run folder another process is writing is refused on every rank with rank 0's line.
Rank 1 may not write: its ``moekit.files`` writes raise, so any write there would fail the run.
"""

from __future__ import annotations

import os
import shutil
import sysconfig
from pathlib import Path

import torch
import torch.distributed as dist

import moekit.files
import moekit.training.loop as loop
from moekit.config import AttentionConfig, ModelConfig, MoEConfig
from moekit.errors import MoekitError, RunError
from moekit.files import folder_lock
from moekit.training.config import RunConfig, TrainConfig
from moekit.training.distributed import Distributed
from moekit.training.metrics import read_metrics

NAN_STEP = 3  # the 1-based step whose loss is not finite on rank 1


def run_config(data: Path) -> RunConfig:
    model = ModelConfig(
        vocab_size=256,
        d_model=16,
        n_layers=2,
        attention=AttentionConfig(n_heads=2),
        dense_ffn_dim=32,
        moe=MoEConfig(n_routed_experts=4, top_k=2, expert_ffn_dim=8, aux_loss_coef=0.01),
        name="dist-train",
    )
    train = TrainConfig(
        steps=5,
        batch_size=4,
        seq_len=16,
        lr=3e-3,
        warmup_steps=0,
        tokenizer="byte",
        data=str(data),
        log_every=1,
        eval_every=5,
        eval_batches=1,
        ckpt_every=2,
    )
    return RunConfig(model, train)


def _outcome(fn) -> dict:
    try:
        fn()
    except MoekitError as e:
        return {"error": type(e).__name__, "exit_code": e.exit_code, "speaks": e.speaks, "message": str(e)}
    return {"error": None}


def _nan_on_rank1(rank: int):
    """``balance_terms`` that adds a NaN term on rank 1 at ``NAN_STEP`` (training calls only)."""
    real, calls = loop.balance_terms, [0]

    def terms(routing, moe, reduce=None):
        out = real(routing, moe, reduce)
        calls[0] += 1
        if rank == 1 and calls[0] == NAN_STEP:
            out = {**out, "injected": torch.tensor(float("nan"))}
        return out

    return terms


def run_train_cases(rank: int, world: int, work: Path) -> dict:
    os.environ["MOEKIT_CACHE_DIR"] = str(work / "cache")
    data = work / "corpus"
    if rank == 0 and not data.exists():
        shutil.copytree(
            Path(sysconfig.get_paths()["stdlib"]) / "json", data, ignore=shutil.ignore_patterns("__pycache__")
        )
    dist.barrier()
    run = run_config(data)
    par = Distributed()  # adopts this launch's process group
    res: dict = {"pid": os.getpid()}

    def rank1_fails():
        if rank == 1:
            raise RunError("rank 1 could not write")

    res["together"] = _outcome(lambda: par.together(rank1_fails))
    res["all_true"] = par.all_true(rank != 1)

    if rank == 1:  # rank 1 must not write anything: any moekit write there fails its run

        def refuse(path):
            raise PermissionError(13, "rank 1 may not write", str(path))

        moekit.files._open_for_write = refuse
    real_terms = loop.balance_terms
    for name, skip in (("nan-skip", True), ("nan-stop", False)):
        out = work / name
        loop.balance_terms = _nan_on_rank1(rank)
        try:
            result: dict = {}

            def go(out=out, skip=skip, result=result):
                r = loop.train(run, out, skip_nonfinite=skip, parallel=par)
                result.update(step=r.step, skipped=r.summary["skipped_steps"])

            res[name] = {**_outcome(go), **result}
        finally:
            loop.balance_terms = real_terms
        dist.barrier()
        if rank == 0:
            metrics = read_metrics(out)
            res[name]["metric_steps"] = [r["step"] for r in metrics]
            res[name]["skipped_steps"] = [r["skipped_steps"] for r in metrics]
            res[name]["checkpoints"] = sorted(p.name for p in (out / "checkpoints").iterdir())
            res[name]["lock_holder"] = (out / moekit.files.LOCK_FILE).read_text().strip()

    locked = work / "locked"
    locked.mkdir(exist_ok=True)
    if rank == 0:
        with folder_lock(locked, "run directory"):
            dist.barrier()
            res["locked"] = _outcome(lambda: loop.train(run, locked, parallel=par))
    else:
        dist.barrier()
        res["locked"] = _outcome(lambda: loop.train(run, locked, parallel=par))
    res["locked"]["entries"] = sorted(p.name for p in locked.iterdir())
    return res
