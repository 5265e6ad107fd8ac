"""``torchrun -m moekit train``: the README's command gives one process's losses, rank 0 alone
writes, checkpoints do not depend on the layout, and a bad layout fails on every rank with one line."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import sysconfig
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
    """The README's torchrun line, split: (nproc, moekit train arguments)."""
    line = re.search(r"^torchrun .*$", (ROOT / "README.md").read_text(), re.M).group(0)
    words = shlex.split(line)
    assert words[:2] == ["torchrun", "--nproc-per-node"] and words[3:5] == ["-m", "moekit"]
    return int(words[2]), words[5:]


def test_readme_command_trains_like_one_process(corpus, tmp_path, monkeypatch, torchrun):
    monkeypatch.setenv("MOEKIT_CACHE_DIR", str(tmp_path / "cache"))
    torch.set_num_threads(1)
    nproc, args = readme_torchrun()
    small = [*args, "--steps", "4", "--data", str(corpus), *shlex.split(SMALL)]
    proc = torchrun(
        nproc, ["-m", "moekit", *small, "--out", str(tmp_path / "many")], MOEKIT_CACHE_DIR=str(tmp_path / "cache")
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("val loss") == 1  # rank 0 alone prints
    i = small.index("--ep")
    one = small[:i] + small[i + 2 :]  # the same command in one process
    assert main([*one, "--out", str(tmp_path / "one")]) == 0
    many, single = read_metrics(tmp_path / "many"), read_metrics(tmp_path / "one")
    assert [r["step"] for r in many] == [1, 2, 3, 4]  # one writer: no interleaved records
    for a, b in zip(many, single, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
        assert a["a2a_bytes"] > 0 and a["a2a_s"] >= 0
    assert many[-1]["val_loss"] == pytest.approx(single[-1]["val_loss"], rel=1e-5)
    summary = json.loads((tmp_path / "many" / "summary.json").read_text())
    assert summary["layout"] == {"dp": nproc, "ep": 2, "etp": 1}
    # The checkpoint holds whole tensors under global expert ids: the same names and shapes as one process's.
    w_many = load_file(tmp_path / "many" / "checkpoints" / "step_0000004" / "model.safetensors")
    w_one = load_file(tmp_path / "one" / "checkpoints" / "step_0000004" / "model.safetensors")
    assert {k: v.shape for k, v in w_many.items()} == {k: v.shape for k, v in w_one.items()}
    for k in w_one:  # Adam magnifies 1e-7 gradient differences where second moments are tiny
        assert (w_many[k] - w_one[k]).norm() <= 1e-4 * w_one[k].norm(), k
    # ... so one process resumes it and continues as it continues its own run.
    for name in ("many", "one"):
        assert main(["train", "--resume", "--out", str(tmp_path / name), "--steps", "6", "--quiet"]) == 0
    resumed = [r["loss"] for r in read_metrics(tmp_path / "many")[4:]]
    assert resumed == pytest.approx([r["loss"] for r in read_metrics(tmp_path / "one")[4:]], rel=1e-4)
    assert len(resumed) == 2


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
