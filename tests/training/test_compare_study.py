"""Studies: the architectures line-up matches FLOPs, runs end to end, and the ablation test works."""

from __future__ import annotations

import json

import pytest
import torch

from moekit.accounting import account
from moekit.models.transformer import MoETransformer
from moekit.training.ablation import disabled_experts, expert_ablation
from moekit.training.compare import (
    STUDIES,
    Study,
    StudyError,
    architecture_variants,
    check_flops_match,
    register_study,
    run_study,
    study_runs,
)
from moekit.training.config import RunConfig, TrainConfig
from moekit.training.data import val_batches


def test_architectures_match_flops_within_5_percent():
    variants = {v.name: v.model for v in architecture_variants()}
    assert list(variants) == ["dense", "hash", "switch", "gshard", "deepseekmoe"]
    flops = {n: account(m, seq_len=256).flops.forward_per_token for n, m in variants.items()}
    assert max(flops.values()) / min(flops.values()) - 1 < 0.05
    experts = {
        n: account(m).params.breakdown["routed_experts"] + account(m).params.breakdown["shared_experts"]
        for n, m in variants.items()
        if m.moe is not None
    }
    assert len(set(experts.values())) == 1  # every MoE holds the same expert parameters; routers differ
    ds = variants["deepseekmoe"].moe
    assert (ds.n_routed_experts, ds.top_k, ds.n_shared_experts, ds.expert_ffn_dim) == (31, 7, 1, 64)
    assert variants["hash"].moe.router == "hash" and variants["switch"].moe.router == "switch"
    assert study_runs(STUDIES["architectures"], 10)  # the study's own check passes


def test_flops_mismatch_is_refused(tiny_model):
    runs = {"a": RunConfig(tiny_model(), TrainConfig()), "b": RunConfig(tiny_model(top_k=4), TrainConfig())}
    with pytest.raises(StudyError, match="FLOPs per token differ"):
        check_flops_match(runs, 0.05)


def test_disabled_experts_are_never_chosen_and_restored(tiny_model):
    model = MoETransformer(tiny_model(aux_free_rate=0.01)).eval()
    ids = torch.randint(0, 256, (2, 16))
    bias_before = model.layers[0].ffn.router.selection_bias.clone()
    with disabled_experts(model, [[0, 1], [3]]):
        routing = model(ids).routing
        assert routing[0].counts_E[:2].tolist() == [0, 0] and routing[1].counts_E[3] == 0
    assert torch.equal(model.layers[0].ffn.router.selection_bias, bias_before)
    assert model(ids).routing[0].counts_E[:2].sum() > 0


def test_expert_ablation_reports_the_loss_increase(tiny_model):
    model = MoETransformer(tiny_model()).eval()
    batches = val_batches(torch.randint(0, 256, (512,)).numpy(), 2, 32, 2)
    result = expert_ablation(model, batches, torch.device("cpu"))
    assert result["delta"] == pytest.approx(result["ablated_loss"] - result["base_loss"])
    assert [len(d) for d in result["disabled"]] == [1, 1] and result["n_experts"] == [4, 4]


def test_architectures_study_end_to_end(tmp_path, text_dir):
    tiny = {
        "train.data": str(text_dir),
        "train.tokenizer": "byte",
        "train.batch_size": 2,
        "train.seq_len": 16,
        "train.eval_batches": 1,
    }
    rows = run_study("architectures", tmp_path / "study", steps=2, overrides=tiny)
    on_disk = json.loads((tmp_path / "study" / "results.json").read_text())
    assert (
        [r["name"] for r in on_disk]
        == ["dense", "hash", "switch", "gshard", "deepseekmoe"]
        == [r["name"] for r in rows]
    )
    for r in on_disk:
        assert {"name", "total_params", "active_params", "flops_per_token", "val_loss", "max_vio"} <= set(r)
    assert on_disk[0]["max_vio"] is None and on_disk[3]["max_vio"] is not None
    assert on_disk[0]["ablation_delta_top1"] is None and on_disk[4]["ablation_delta_top1"] is not None
    assert on_disk[4]["ablation_delta_eighth"] != on_disk[4]["ablation_delta_top1"]  # 4 of 31 experts vs 1
    md = (tmp_path / "study" / "results.md").read_text()
    assert "| deepseekmoe |" in md and "Specialisation test" in md
    assert (tmp_path / "study" / "val_curves.png").stat().st_size > 1000
    with pytest.raises(StudyError, match="already holds study results"):
        run_study("architectures", tmp_path / "study", steps=2, overrides=tiny)


def test_a_new_study_is_one_registration(tmp_path, text_dir, tiny_model, monkeypatch):
    from moekit.training.compare import Variant

    monkeypatch.setattr("moekit.training.compare.STUDIES", dict(STUDIES))
    register_study(
        Study(
            name="toy",
            title="toy",
            variants=lambda: [Variant("a", tiny_model()), Variant("b", tiny_model(aux_loss_coef=0.0))],
            train=lambda steps: TrainConfig(
                steps=steps, batch_size=2, seq_len=16, eval_batches=1, tokenizer="byte", data=str(text_dir)
            ),
            default_steps=1,
        )
    )
    rows = run_study("toy", tmp_path / "toy")
    assert [r["name"] for r in rows] == ["a", "b"]


def test_an_interrupted_study_resumes(tmp_path, text_dir, tiny_model, monkeypatch):
    import signal

    from moekit.training.compare import Variant
    from moekit.training.loop import TrainCallback

    class InterruptB(TrainCallback):
        def __init__(self, name):
            self.name = name

        def on_step(self, step, record):
            if self.name == "b" and step == 1:
                signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr("moekit.training.compare.STUDIES", dict(STUDIES))
    register_study(
        Study(
            name="toy2",
            title="toy",
            variants=lambda: [Variant("a", tiny_model()), Variant("b", tiny_model(top_k=1))],
            train=lambda steps: TrainConfig(
                steps=steps, batch_size=2, seq_len=16, eval_batches=1, tokenizer="byte", data=str(text_dir)
            ),
            default_steps=2,
        )
    )
    with pytest.raises(KeyboardInterrupt):
        run_study("toy2", tmp_path / "s", progress=InterruptB)
    assert not (tmp_path / "s" / "results.json").exists()
    rows = run_study("toy2", tmp_path / "s", resume=True)
    assert [r["tokens"] for r in rows] == [64, 64]
