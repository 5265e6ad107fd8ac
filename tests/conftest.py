"""Shared fixtures: small configs that every test module can build models from."""

from __future__ import annotations

import pytest
import torch

from moekit.config import AttentionConfig, ModelConfig, MoEConfig


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _fixed_threads(monkeypatch):
    """CLI runs in tests (and the processes they start) take one thread, not ``moekit.runtime``'s
    choice from the machine's load: runs compared for exact equality must not differ in threads."""
    monkeypatch.setenv("MOEKIT_THREADS", "1")


def small_config(**moe_overrides) -> ModelConfig:
    moe = dict(n_routed_experts=8, top_k=2, expert_ffn_dim=24, n_shared_experts=1, first_k_dense=1)
    moe.update(moe_overrides)
    return ModelConfig(
        vocab_size=97,
        d_model=32,
        n_layers=3,
        attention=AttentionConfig(n_heads=4, n_kv_heads=2),
        dense_ffn_dim=48,
        moe=MoEConfig(**moe),
    )


@pytest.fixture
def tiny_cfg() -> ModelConfig:
    return small_config()
