"""The training loop's multi-process hooks in one process (the multi-process runs are in
tests/parallel): no-ops that keep one code path, and a non-finite loss stopping the run."""

from __future__ import annotations

import pytest
import torch

from moekit.cli import main
from moekit.config import ConfigError
from moekit.training.distributed import Distributed


def test_one_process_hooks_are_identities():
    par = Distributed()
    batch = torch.arange(12).view(4, 3)
    assert not par.active and par.is_main and par.reduce is None
    assert par.shard_batch(batch) is batch
    assert par.should_stop(True) and not par.should_stop(False)
    assert par.all_true(torch.tensor(True)) and not par.all_true(torch.tensor(False))
    assert par.mean(torch.tensor(2.5, requires_grad=True)) == 2.5
    assert par.relaunch_prefix() == "" and par.flags() == ""
    with pytest.raises(ConfigError, match="ep must be"):
        par.together(lambda: Distributed(ep=0))


def test_layout_must_fit_one_process(tiny_model):
    with pytest.raises(ConfigError, match=r"ep \(2\) must divide dp \(1\)"):
        Distributed(ep=2).setup(tiny_model(), 8)


def test_non_finite_loss_stops_without_saving(text_dir, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--preset", "tiny", "--data", str(text_dir), "--steps", "20", "--out", str(out), "--quiet"]
    for kv in ("tokenizer=byte", "batch_size=2", "seq_len=16", "lr=1e12", "grad_clip=0", "warmup_steps=0"):
        args += ["--set", f"train.{kv}"]
    assert main(args) == 1
    assert "non-finite loss" in capsys.readouterr().err
    assert not (out / "checkpoints").exists()
