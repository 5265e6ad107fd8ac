"""The balancing study: four variants of one model that differ only in balancing, run end to end."""

from __future__ import annotations

import dataclasses
import json

import pytest

from moekit.accounting import account
from moekit.config import MoEConfig
from moekit.layers.router import Router
from moekit.training.compare import BALANCING_FIELDS, STUDIES, balancing_variants, run_study, study_runs
from moekit.training.loop import load_run
from moekit.training.metrics import read_metrics

NAMES = ["none", "aux_loss", "deepseek", "aux_free"]


def _without_balancing(moe) -> dict:
    d = dataclasses.asdict(moe)
    return {k: v for k, v in d.items() if k not in BALANCING_FIELDS}


def test_variants_differ_only_in_balancing_fields():
    variants = balancing_variants()
    assert [v.name for v in variants] == NAMES
    models = [v.model.replace(name="") for v in variants]
    bare = [m.replace(moe=None).to_dict() for m in models]
    assert all(b == bare[0] for b in bare)  # same model apart from the MoE block
    assert all(_without_balancing(m.moe) == _without_balancing(models[0].moe) for m in models)
    none, aux, deepseek, free = (m.moe for m in models)
    defaults = {f.name: f.default for f in dataclasses.fields(MoEConfig)}
    assert all(getattr(none, f) == defaults[f] for f in BALANCING_FIELDS)  # no balancing at all
    assert (aux.aux_loss_coef, aux.device_loss_coef, aux.aux_free_rate) == (0.01, 0.0, 0.0)
    assert (deepseek.aux_loss_coef, deepseek.device_loss_coef, deepseek.n_devices) == (0.01, 0.05, 4)
    assert deepseek.n_routed_experts % deepseek.n_devices == 0
    assert free.aux_free_rate > 0 and free.aux_loss_coef == free.device_loss_coef == 0.0
    assert {m.moe.score_func for m in models} == {"sigmoid"}  # one gate for all: a fair comparison
    assert none.n_shared_experts == 1 and none.top_k < none.n_routed_experts  # DeepSeekMoE-style
    sizes = {(account(m).params.total, account(m).params.active) for m in models}
    assert len(sizes) == 1
    assert study_runs(STUDIES["balancing"], 10)  # the study's FLOPs check (exactly equal) passes


@pytest.fixture
def tiny_balancing(monkeypatch):
    """The balancing study on a tiny model: 8 routed experts top-2 + 1 shared, 2 devices."""
    small = dict(d_model=32, n_layers=2, n_heads=2, n_experts=8, top_k=2, expert_ffn=16, n_devices=2, vocab_size=256)
    monkeypatch.setattr(STUDIES["balancing"], "variants", lambda: balancing_variants(**small))


def test_balancing_study_end_to_end(tmp_path, text_dir, tiny_balancing):
    tiny = {
        "train.data": str(text_dir),
        "train.tokenizer": "byte",
        "train.batch_size": 2,
        "train.seq_len": 16,
        "train.eval_batches": 1,
        "train.log_every": 1,
    }
    rows = run_study("balancing", tmp_path / "study", steps=3, overrides=tiny)
    on_disk = json.loads((tmp_path / "study" / "results.json").read_text())
    assert [r["name"] for r in on_disk] == NAMES == [r["name"] for r in rows]
    keys = {"name", "total_params", "active_params", "flops_per_token", "val_loss", "max_vio", "max_vio_batch"}
    for r in on_disk:
        assert keys <= set(r)
        assert r["max_vio"] is not None and r["max_vio"] >= 0 and r["tokens"] == 3 * 2 * 16
    assert len({(r["total_params"], r["active_params"], r["flops_per_token"]) for r in on_disk}) == 1
    records = {name: read_metrics(tmp_path / "study" / name) for name in NAMES}
    for name, recs in records.items():  # every logged step records MaxVio and the balance loss
        assert [r["step"] for r in recs] == [1, 2, 3]
        assert all(r["max_vio"] is not None and "aux_loss" in r for r in recs)
        aux = [r["aux_loss"] for r in recs]
        assert all(a > 0 for a in aux) if name in ("aux_loss", "deepseek") else aux == [0.0, 0.0, 0.0]
    # Same initial weights and first batch: step 1 differs only in the balance terms.
    first = {name: recs[0] for name, recs in records.items()}
    assert len({r["loss"] for r in first.values()}) == 1 and len({r["max_vio"] for r in first.values()}) == 1
    assert first["deepseek"]["aux_loss"] > first["aux_loss"]["aux_loss"]  # plus the device-level term
    routers = [m for m in load_run(tmp_path / "study" / "aux_free").model.modules() if isinstance(m, Router)]
    assert len(routers) == 2 and all(r.selection_bias.abs().sum() > 0 for r in routers)  # the update ran
    md = (tmp_path / "study" / "results.md").read_text()
    assert all(f"| {n} |" in md for n in NAMES) and "Aux-loss-free claim" in md
    assert (tmp_path / "study" / "val_curves.png").stat().st_size > 1000
