"""Exporting moekit's own models: the quickstart's design as a folder transformers loads natively,
and a config no Hugging Face type expresses refused with the nearest type and every differing field."""

from __future__ import annotations

import shutil
import sysconfig
from pathlib import Path

import pytest
import torch

from moekit.cli import main
from moekit.config import AttentionConfig, ModelConfig, MoEConfig
from moekit.interop.hf_export import infer_model_type, to_hf_config
from moekit.interop.pretrained import from_pretrained
from moekit.interop.types import UnsupportedError
from moekit.presets import get_preset
from moekit.training.config import RunConfig, TrainConfig
from moekit.training.loop import train


def test_tiny_preset_is_a_glm4_moe():
    """The quickstart's preset is a design transformers has a native type for."""
    assert infer_model_type(get_preset("tiny")) == "glm4_moe"


def test_short_trained_tiny_run_converts_and_transformers_gives_the_same_logits(tmp_path, capsys):
    """`moekit train --preset tiny` (the quickstart's model, over bytes, a few steps), then
    `moekit convert RUN OUT`: AutoModelForCausalLM loads OUT and gives moekit's logits."""
    transformers = pytest.importorskip("transformers")
    data = tmp_path / "corpus"
    shutil.copytree(Path(sysconfig.get_paths()["stdlib"]) / "json", data, ignore=shutil.ignore_patterns("__pycache__"))
    train_cfg = TrainConfig(steps=4, batch_size=2, seq_len=32, tokenizer="byte", data=str(data), eval_batches=1)
    run = RunConfig(get_preset("tiny"), train_cfg)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # NOTE: a small model on a busy machine trains ~5x faster on one thread
    try:
        train(run, tmp_path / "run")
    finally:
        torch.set_num_threads(threads)
    assert main(["convert", str(tmp_path / "run"), str(tmp_path / "hf")]) == 0
    assert "wrote hf checkpoint" in capsys.readouterr().out

    ours = from_pretrained(tmp_path / "run")
    bias = ours.layers[1].ffn.router.selection_bias
    assert bias is not None and bias.abs().sum() > 0  # aux-loss-free balancing moved it: it must travel
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "hf", dtype=torch.float32, experts_implementation="eager"
    ).eval()
    assert type(theirs).__name__ == "Glm4MoeForCausalLM"
    ids = torch.randint(0, ours.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ours(ids).logits, theirs(ids).logits
    assert ((a - b).abs().max() / b.abs().max()).item() <= 1e-5


def _cfg(**moe) -> ModelConfig:
    kw = dict(n_routed_experts=6, top_k=2, expert_ffn_dim=16, first_k_dense=1)
    kw.update(moe)
    return ModelConfig(
        vocab_size=50,
        d_model=24,
        n_layers=3,
        dense_ffn_dim=32,
        attention=AttentionConfig(n_heads=4),
        moe=MoEConfig(**kw),
    )


def test_unexpressible_config_names_the_nearest_type_and_every_differing_field():
    # The old quickstart design: softmax without renormalisation, an ungated shared expert, and
    # on top a capacity factor and expert biases that no type has.
    cfg = _cfg(n_shared_experts=1, norm_topk_prob=False, capacity_factor=1.25, expert_bias=True)
    with pytest.raises(UnsupportedError) as e:
        infer_model_type(cfg)
    msg = str(e.value)
    assert "\n" not in msg
    assert "nearest is 'glm4_moe'" in msg and "3 field(s)" in msg
    for field in ("moe.capacity_factor=1.25", "moe.expert_bias=True", "moe.score_func='softmax'"):
        assert field in msg


def test_an_explicit_model_type_lists_every_field_it_cannot_write():
    cfg = _cfg(n_shared_experts=1, score_func="sigmoid", selection_bias=True)
    with pytest.raises(UnsupportedError) as e:
        to_hf_config(cfg, "mixtral")
    msg = str(e.value)
    assert "'mixtral'" in msg and "4 field(s)" in msg
    for field in ("moe.score_func", "moe.selection_bias", "moe.n_shared_experts", "moe layers"):
        assert field in msg
    assert to_hf_config(cfg)["model_type"] == "glm4_moe"
