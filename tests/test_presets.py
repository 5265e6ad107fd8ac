"""Presets: each one's analytic count equals the built model, and the released models' presets
equal what their published config.json parses to."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from moekit.accounting import count_params
from moekit.config import ConfigError, ModelConfig, set_by_path
from moekit.interop.hf_config import config_from_hf
from moekit.presets import PRESETS, get_preset, preset_names

HF_CONFIGS = Path(__file__).parent / "data" / "hf_configs"

# preset -> the published config.json it was taken from (tests/data/hf_configs/)
FROM_PUBLISHED_CONFIG = {
    "mixtral-8x7b": "mixtral-8x7b",
    "mixtral-8x22b": "mixtral-8x22b",
    "deepseek-moe-16b": "deepseek-moe-16b",
    "deepseek-v2-lite": "deepseek-v2-lite",
    "deepseek-v2": "deepseek-v2",
    "deepseek-v3": "deepseek-v3",
    "qwen1.5-moe-a2.7b": "qwen1.5-moe-a2.7b",
    "qwen3-30b-a3b": "qwen3-30b-a3b",
    "olmoe-1b-7b": "olmoe-1b-7b-0924",
    "gpt-oss-20b": "gpt-oss-20b",
    "gpt-oss-120b": "gpt-oss-120b",
    "phi-3.5-moe": "phi-3.5-moe",
    "llama-4-scout": "llama-4-scout-17b-16e",
    "llama-4-maverick": "llama-4-maverick-17b-128e",
    "llama2-7b": "llama2-7b",
    "deepseek-llm-7b": "deepseek-llm-7b",
}
REQUIRED = ["mixtral-8x7b", "mixtral-8x22b", "deepseek-moe-2b", "deepseek-moe-16b", "deepseek-moe-145b"]
REQUIRED += ["qwen1.5-moe-a2.7b", "deepseek-v3", "tiny", "tiny-mixtral", "tiny-dense"]


@pytest.mark.filterwarnings("ignore:router='expert_choice' is not causal")
@pytest.mark.parametrize("name", preset_names())
def test_analytic_total_equals_built_model(name):
    """The model built on the meta device (no memory, even for 671B) holds exactly the analytic
    total. rope_scaling is dropped first: it changes no parameter, and the model's rotary module
    need not support every published scaling kind for this count."""
    from moekit.models import MoETransformer

    cfg = set_by_path(get_preset(name), {"attention.rope_scaling": None})
    with torch.device("meta"):
        model = MoETransformer(cfg)
    assert count_params(cfg).total == sum(p.numel() for p in model.parameters())
    assert count_params(cfg).total == count_params(get_preset(name)).total


@pytest.mark.parametrize("name", sorted(FROM_PUBLISHED_CONFIG))
def test_preset_equals_published_config(name):
    published = json.loads((HF_CONFIGS / f"{FROM_PUBLISHED_CONFIG[name]}.json").read_text())
    ours, theirs = get_preset(name).to_dict(), config_from_hf(published).to_dict()
    ours.pop("name")
    theirs.pop("name")
    assert ours == theirs


def test_required_presets_exist():
    assert set(REQUIRED) <= set(PRESETS)


@pytest.mark.parametrize("name", preset_names())
def test_preset_round_trips_and_is_named(name):
    cfg = get_preset(name)
    assert cfg.name == name
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg


def test_get_preset_returns_a_copy():
    cfg = get_preset("tiny")
    cfg.vocab_size = 12345
    cfg.moe.top_k = 1
    assert get_preset("tiny").vocab_size == 4096
    assert get_preset("tiny").moe.top_k == 4


def test_unknown_preset_lists_known_names():
    with pytest.raises(ConfigError, match="unknown preset 'mixtral-8x8b'.*mixtral-8x7b.*tiny-dense"):
        get_preset("mixtral-8x8b")


def test_tiny_presets_are_cpu_sized_and_vocab_overridable():
    for name in ("tiny", "tiny-mixtral", "tiny-dense"):
        cfg = get_preset(name)
        assert count_params(cfg).total < 20_000_000
        bigger = cfg.replace(vocab_size=8000)
        grew = count_params(bigger).total - count_params(cfg).total
        assert grew == (8000 - cfg.vocab_size) * cfg.d_model * (1 if cfg.tie_embeddings else 2)


def test_tiny_is_deepseekmoe_shaped():
    cfg = get_preset("tiny")
    assert cfg.moe_layer_ids == [1, 2, 3]  # first layer dense
    assert cfg.moe.n_shared_experts == 1 and cfg.moe.n_routed_experts > 8 and cfg.moe.top_k > 2
    assert get_preset("tiny-dense").moe is None
    assert get_preset("tiny-mixtral").moe_layer_ids == [0, 1, 2, 3]
