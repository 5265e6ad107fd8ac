"""``from_pretrained(run_dir)``: a training run directory loads its newest checkpoint and tokenizer.

The run is written by training's own writers (``RunConfig.to_dict``, ``save_checkpoint``), so the
reader in ``moekit.interop.run_folder`` cannot drift from the layout training produces.
"""

from __future__ import annotations

import json

import pytest
import torch

import moekit
from moekit.config import AttentionConfig, ModelConfig, MoEConfig
from moekit.errors import CheckpointError
from moekit.models import MoETransformer
from moekit.tokenizer import ByteTokenizer
from moekit.training.checkpoint import save_checkpoint
from moekit.training.config import RunConfig, TrainConfig


def write_run(run_dir, tokenizer: str = "byte", steps=(1, 2), tokenizer_json: str | None = None):
    vocab = 256 if tokenizer == "byte" else 300
    cfg = ModelConfig(
        vocab_size=vocab, d_model=16, n_layers=2, dense_ffn_dim=24, max_seq_len=64,
        attention=AttentionConfig(n_heads=2), moe=MoEConfig(n_routed_experts=3, top_k=2, expert_ffn_dim=12),
    )  # fmt: skip
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(RunConfig(cfg, TrainConfig(tokenizer=tokenizer)).to_dict()))
    models = []
    for step in steps:
        torch.manual_seed(step)
        model = MoETransformer(cfg).eval()
        save_checkpoint(run_dir, step, model, {"step": step}, keep=5, tokenizer_json=tokenizer_json)
        models.append(model)
    return models


def test_run_dir_loads_its_newest_checkpoint(tmp_path):
    models = write_run(tmp_path / "run")
    loaded = moekit.from_pretrained(tmp_path / "run")
    ids = torch.randint(0, 256, (1, 7))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, models[-1](ids).logits, rtol=1e-6, atol=1e-7)
    assert isinstance(loaded.tokenizer, ByteTokenizer) and loaded.generation_config is None
    # A checkpoint folder inside the run also knows the run's byte tokenizer.
    first = moekit.from_pretrained(tmp_path / "run" / "checkpoints" / "step_0000001")
    assert isinstance(first.tokenizer, ByteTokenizer)
    with torch.no_grad():
        torch.testing.assert_close(first(ids).logits, models[0](ids).logits, rtol=1e-6, atol=1e-7)


def test_bpe_run_tokenizer_ends_generation_at_end_of_text(tmp_path):
    pytest.importorskip("tokenizers")
    from moekit.training.tokenizer import BPETokenizer

    tok = BPETokenizer.train(["def f(x):\n    return x + 1\n"] * 20, 270)
    write_run(tmp_path / "run", "bpe", steps=(3,), tokenizer_json=tok.to_str())
    loaded = moekit.from_pretrained(tmp_path / "run").tokenizer
    assert loaded.encode("return x") == tok.encode_batch(["return x"])[0]
    assert loaded.eos_token_ids == [tok.eot_id] == [0]


def test_run_dir_without_checkpoints_is_a_clear_error(tmp_path):
    write_run(tmp_path / "run", steps=())
    with pytest.raises(CheckpointError, match="without checkpoints"):
        moekit.from_pretrained(tmp_path / "run")
