"""The training loop: it learns, it resumes exactly, it guards its output directory."""

from __future__ import annotations

import json
import math
import signal

import pytest
import torch

from moekit.models.transformer import MoETransformer
from moekit.training.config import RunConfig, TrainConfig
from moekit.training.data import DataError
from moekit.training.loop import RunDirError, TrainCallback, build_optimizer, lr_at, train
from moekit.training.metrics import read_metrics


def test_step_schedule_warms_up_then_decays_at_80_and_90_percent(tiny_model):
    run = RunConfig(tiny_model(), TrainConfig(steps=100, lr=1.0, warmup_steps=5))
    lrs = [lr_at(s, run) for s in range(100)]
    assert lrs[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert set(lrs[5:80]) == {1.0}
    assert lrs[80:90] == pytest.approx([0.316] * 10) and lrs[90:] == pytest.approx([0.316**2] * 10)
    short = RunConfig(tiny_model(), TrainConfig(steps=20, lr=1.0, warmup_steps=100))
    assert lr_at(1, short) == 1.0  # warm-up capped at 10% of the steps


def test_cosine_schedule_ends_at_the_floor(tiny_model):
    run = RunConfig(tiny_model(), TrainConfig(steps=100, lr=1.0, warmup_steps=10, schedule="cosine", min_lr_ratio=0.1))
    assert lr_at(10, run) == pytest.approx(1.0)
    assert lr_at(55, run) == pytest.approx(0.55)
    assert lr_at(99, run) == pytest.approx(0.1, abs=1e-3)


def test_weight_decay_on_matrices_only(tiny_model):
    model = MoETransformer(tiny_model())
    opt = build_optimizer(model, RunConfig(tiny_model(), TrainConfig()))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)].rsplit(".", 1)[-1] for p in no_decay["params"]} == {"weight"}  # norm weights
    assert all("norm" in names[id(p)] for p in no_decay["params"])
    assert any("experts.w1" in names[id(p)] for p in decay["params"])
    assert {opt.defaults["betas"]} == {(0.9, 0.95)}


def test_a_tiny_model_learns_real_text(tmp_path, text_dir, tiny_run, tiny_model):
    """60 steps take a byte-level MoE far below the uniform ln(256) = 5.55 nats."""
    run = tiny_run(text_dir, tiny_model().replace(d_model=64), steps=60, batch_size=8, eval_every=30, ckpt_every=60)
    result = train(run, tmp_path / "run")
    summary = result.summary
    assert summary["val_loss"] < 0.6 * math.log(256)  # measured: 2.76 (3.52 after 40 steps of 4)
    records = read_metrics(tmp_path / "run")
    assert [r["step"] for r in records] == list(range(1, 61))
    assert records[-1]["loss"] < records[0]["loss"] - 1.5
    for r in records:
        assert {"step", "loss", "aux_loss", "lr", "tokens_per_s", "max_vio"} <= set(r)
        assert r["aux_loss"] > 0 and r["max_vio"] >= 0 and r["tokens_per_s"] > 0
    evals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in evals] == [30, 60]
    assert len(evals[-1]["expert_load"]) == 2 and sum(evals[-1]["expert_load"][0]) == pytest.approx(1.0)
    on_disk = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert {"val_loss", "total_params", "active_params", "flops_per_token"} <= set(on_disk)
    assert on_disk["active_params"] < on_disk["total_params"]
    assert json.loads((tmp_path / "run" / "config.json").read_text()) == run.to_dict()


class _InterruptAt(TrainCallback):
    def __init__(self, step: int, sig: int = signal.SIGINT):
        self.step, self.sig = step, sig

    def on_step(self, step, record):
        if step == self.step:
            signal.raise_signal(self.sig)  # the real handler path, as a Ctrl-C would take


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_resume_after_interrupt_reproduces_the_uninterrupted_run(tmp_path, text_dir, tiny_run, tiny_model, sig):
    """Exactly, on CPU: router noise (RNG), aux-free bias (buffers), Adam moments, data position."""
    model = tiny_model(router="noisy_topk", aux_free_rate=0.01, aux_loss_coef=0.01)
    run = tiny_run(text_dir, model, steps=10, ckpt_every=100)
    train(run, tmp_path / "a")
    interrupted = train(run, tmp_path / "b", callback=_InterruptAt(4, sig))
    assert interrupted.interrupted and interrupted.step == 4 and interrupted.summary is None
    assert interrupted.checkpoint.name == "step_0000004"
    resumed = train(None, tmp_path / "b", resume=True)
    assert not resumed.interrupted and resumed.step == 10
    losses = [[r["loss"] for r in read_metrics(tmp_path / d)] for d in ("a", "b")]
    assert len(losses[0]) == 10 and losses[0] == losses[1]
    vals = [[r["val_loss"] for r in read_metrics(tmp_path / d) if "val_loss" in r] for d in ("a", "b")]
    assert vals[0] == vals[1]
    a = torch.load(tmp_path / "a/checkpoints/step_0000010/trainer.pt", weights_only=True)
    b = torch.load(tmp_path / "b/checkpoints/step_0000010/trainer.pt", weights_only=True)
    assert a["position"] == b["position"] == 40


def test_resume_extends_a_finished_run(tmp_path, text_dir, tiny_run):
    train(tiny_run(text_dir, steps=4), tmp_path / "r")
    result = train(None, tmp_path / "r", resume=True, steps=6)
    assert result.step == 6 and [r["step"] for r in read_metrics(tmp_path / "r")] == [1, 2, 3, 4, 5, 6]


def test_aux_free_bias_moves_only_when_enabled(tmp_path, text_dir, tiny_run, tiny_model):
    from moekit.training.loop import load_run

    train(tiny_run(text_dir, tiny_model(aux_free_rate=0.01, aux_loss_coef=0.0), steps=4), tmp_path / "r")
    biases = [m.selection_bias for m in load_run(tmp_path / "r").model.modules() if hasattr(m, "selection_bias")]
    assert len(biases) == 2 and all(b.abs().sum() > 0 for b in biases)


def test_output_directory_is_guarded(tmp_path, text_dir, tiny_run, tiny_model):
    run = tiny_run(text_dir, steps=2)
    train(run, tmp_path / "r")
    with pytest.raises(RunDirError, match=r"already holds this run \(2 steps done\); pass --resume"):
        train(run, tmp_path / "r")
    other = tiny_run(text_dir, tiny_model(top_k=1), steps=2)
    with pytest.raises(RunDirError, match=r"different run \(model.moe.top_k: 2 -> 1\)"):
        train(other, tmp_path / "r")
    with pytest.raises(RunDirError, match="different run"):
        train(other, tmp_path / "r", resume=True)
    metrics_before = (tmp_path / "r" / "metrics.jsonl").read_text()
    assert metrics_before  # nothing was overwritten by the refused attempts
    with pytest.raises(DataError):  # a --force that cannot start keeps the old run
        train(other.with_overrides({"train.data": str(tmp_path / "missing")}), tmp_path / "r", force=True)
    assert (tmp_path / "r" / "metrics.jsonl").read_text() == metrics_before
    train(other, tmp_path / "r", force=True)
    assert json.loads((tmp_path / "r" / "config.json").read_text())["model"]["moe"]["top_k"] == 1
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    with pytest.raises(RunDirError, match=r"not empty \(notes.txt\) and holds no moekit run"):
        train(run, tmp_path / "foreign")


def test_dense_model_trains_and_logs_no_max_vio(tmp_path, text_dir, tiny_run, tiny_model):
    dense = tiny_model().replace(moe=None)
    result = train(tiny_run(text_dir, dense, steps=2), tmp_path / "d")
    assert result.summary["max_vio"] is None and result.summary["active_params"] == result.summary["total_params"]
    assert all(r["max_vio"] is None and r["aux_loss"] == 0 for r in read_metrics(tmp_path / "d"))
