"""``torchrun -m moekit train``: the README's command gives one process's losses, rank 0 alone
writes, checkpoints do not depend on the layout, and a bad layout fails on every rank with one line."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import sysconfig
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from moekit.cli import main
from moekit.config import ConfigError
from moekit.presets import get_preset
from moekit.training.distributed import Distributed
from moekit.training.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[2]
SMALL = "--set train.tokenizer=byte --set train.batch_size=4 --set train.seq_len=32 --set train.log_every=1"
SMALL += " --set train.eval_every=4 --set train.eval_batches=2 --set train.warmup_steps=1 --quiet"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    dst = tmp_path_factory.mktemp("corpus") / "json"
    shutil.copytree(Path(sysconfig.get_paths()["stdlib"]) / "json", dst, ignore=shutil.ignore_patterns("__pycache__"))
    return dst


def readme_torchrun() -> list[str]:
    """The README's torchrun training line, split: (nproc, moekit train arguments)."""
    line = re.search(r"^torchrun .* -m moekit train .*$", (ROOT / "README.md").read_text(), re.M).group(0)
    words = shlex.split(line)
    assert words[:2] == ["torchrun", "--nproc-per-node"] and words[3:5] == ["-m", "moekit"]
    return int(words[2]), words[5:]


def test_readme_command_trains_like_one_process(corpus, tmp_path, monkeypatch, torchrun, worker_pid):
    """The README's command (made small) against the same command in one process. Midway, rank 1
    alone gets SIGINT: both ranks stop at the same step with one checkpoint, which one process
    then resumes; the losses of all steps equal the uninterrupted one-process run's."""
    monkeypatch.setenv("MOEKIT_CACHE_DIR", str(tmp_path / "cache"))
    torch.set_num_threads(1)
    nproc, args = readme_torchrun()
    steps = 12
    small = [*args, "--steps", str(steps), "--data", str(corpus), *shlex.split(SMALL)]
    many_dir, one_dir = tmp_path / "many", tmp_path / "one"

    def interrupt_rank1(launcher):
        pid = worker_pid(launcher, 1)
        deadline = time.monotonic() + 120
        while len(read_metrics(many_dir)) < 2 and time.monotonic() < deadline and launcher.poll() is None:
            time.sleep(0.02)
        os.kill(pid, signal.SIGINT)

    proc = torchrun(
        nproc,
        ["-m", "moekit", *small, "--out", str(many_dir)],
        during=interrupt_rank1,
        MOEKIT_CACHE_DIR=str(tmp_path / "cache"),
    )
    assert proc.returncode != 0, proc.stdout  # interrupted (every rank exits 130)
    assert proc.stdout.count("interrupted at step") == 1, proc.stdout + proc.stderr[-2000:]  # rank 0 alone prints
    stopped = int(re.search(r"interrupted at step (\d+)", proc.stdout).group(1))
    assert 2 <= stopped < steps
    assert [p.name for p in (many_dir / "checkpoints").iterdir()] == [f"step_{stopped:07d}"]
    assert [r["step"] for r in read_metrics(many_dir)] == list(range(1, stopped + 1))  # one writer
    w_many = load_file(many_dir / "checkpoints" / f"step_{stopped:07d}" / "model.safetensors")

    i = small.index("--ep")
    one = small[:i] + small[i + 2 :]  # the same command in one process
    assert main([*one, "--out", str(one_dir)]) == 0
    single = read_metrics(one_dir)
    many = read_metrics(many_dir)
    for a, b in zip(many, single, strict=False):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
        assert a["max_vio"] == pytest.approx(b["max_vio"], rel=1e-5)  # of the global batch, not rank 0's rows
        assert a["a2a_bytes"] > 0 and a["a2a_s"] >= 0
    # The checkpoint holds whole tensors under global expert ids: one process's names and shapes.
    w_one = load_file(one_dir / "checkpoints" / f"step_{steps:07d}" / "model.safetensors")
    assert {k: v.shape for k, v in w_many.items()} == {k: v.shape for k, v in w_one.items()}
    # ... so one process resumes it and ends where the uninterrupted one-process run ended.
    assert main(["train", "--resume", "--out", str(many_dir), "--quiet"]) == 0
    many = read_metrics(many_dir)
    assert [r["step"] for r in many] == list(range(1, steps + 1))
    assert [r["loss"] for r in many] == pytest.approx([r["loss"] for r in single], rel=1e-4)
    assert many[-1]["val_loss"] == pytest.approx(single[-1]["val_loss"], rel=1e-4)
    summary = json.loads((one_dir / "summary.json").read_text())
    assert "layout" not in summary


def test_bad_layout_fails_on_every_rank_with_one_line(tmp_path, corpus, torchrun):
    proc = torchrun(
        2,
        ["-m", "moekit", "train", "--preset", "tiny", "--data", str(corpus), "--ep", "3", "--out", str(tmp_path / "r")],
        timeout=120,
    )
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("moekit train: error:")]
    assert errors == ["moekit train: error: ep (3) must divide dp (2): expert parallelism uses data-parallel ranks"]
    ours = proc.stderr.split("torch/distributed/elastic")[0]  # what follows is torchrun's own report
    assert "Traceback" not in ours
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(etp=3), r"etp \(3\) must divide the number of processes \(2\)"),
        (dict(ep=0), "ep must be a positive integer"),
    ],
)
def test_layouts_rejected_before_any_process_group(monkeypatch, kwargs, message):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(ConfigError, match=message):
        Distributed(**kwargs).setup(get_preset("tiny"), 8)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error shown without CUDA")
def test_nccl_without_cuda_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="--backend nccl needs CUDA"):
        Distributed(backend="nccl")
