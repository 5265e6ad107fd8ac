"""Fixtures for training tests: a small text corpus, a private cache, tiny run configs.

Training tests run single-threaded: on a small, shared CPU two OpenMP threads per process made
tiny models ~10x slower than one (threads spin waiting for each other), and results do not
depend on the thread count we pick as long as it is fixed.
"""

from __future__ import annotations

import shutil
import sysconfig
from pathlib import Path

import pytest
import torch

from moekit.config import AttentionConfig, ModelConfig, MoEConfig
from moekit.training.config import RunConfig, TrainConfig


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("MOEKIT_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "moekit-cache"))


@pytest.fixture(scope="session")
def text_dir(tmp_path_factory) -> Path:
    """The ``json`` package of the standard library: ~40 kB of real Python in 5 files."""
    src = Path(sysconfig.get_paths()["stdlib"]) / "json"
    dst = tmp_path_factory.mktemp("corpus") / "json"
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
    return dst


def _tiny_model(**moe) -> ModelConfig:
    moe_kw = dict(n_routed_experts=4, top_k=2, expert_ffn_dim=32, aux_loss_coef=0.01)
    moe_kw.update(moe)
    return ModelConfig(
        vocab_size=256,
        d_model=32,
        n_layers=2,
        attention=AttentionConfig(n_heads=2),
        dense_ffn_dim=64,
        moe=MoEConfig(**moe_kw),
        name="test-tiny",
    )


def _tiny_run(data: Path, model: ModelConfig | None = None, **train) -> RunConfig:
    kw = dict(
        steps=8,
        batch_size=4,
        seq_len=32,
        lr=3e-3,
        warmup_steps=2,
        tokenizer="byte",
        data=str(data),
        log_every=1,
        eval_every=4,
        eval_batches=2,
        ckpt_every=4,
    )
    kw.update(train)
    return RunConfig(model or _tiny_model(), TrainConfig(**kw))


@pytest.fixture
def tiny_model():
    """``tiny_model(**moe_overrides)``: a 2-layer, 32-wide MoE LM over bytes."""
    return _tiny_model


@pytest.fixture
def tiny_run():
    """``tiny_run(data, model=None, **train_overrides)``: a seconds-long byte-level run config."""
    return _tiny_run
