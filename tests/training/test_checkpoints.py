"""Checkpoints round-trip exactly, are pruned, and damage is reported, never loaded."""

from __future__ import annotations

import json

import pytest
import torch

from moekit.models.transformer import MoETransformer
from moekit.training.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)


@pytest.fixture
def model(tiny_model) -> MoETransformer:
    return MoETransformer(tiny_model())


def test_round_trip_with_buffers_and_tied_embeddings(tmp_path, tiny_model):
    cfg = tiny_model(aux_free_rate=0.01).replace(tie_embeddings=True)
    model = MoETransformer(cfg)
    for m in model.modules():
        if getattr(m, "selection_bias", None) is not None:
            m.selection_bias.normal_()
    state = {"step": 3, "rng": torch.get_rng_state(), "nested": {"x": [1, 2.5, None]}}
    path = save_checkpoint(tmp_path, 3, model, state, keep=2)
    other = MoETransformer(cfg)
    got = load_checkpoint(path, other)
    for (k, a), b in zip(model.state_dict().items(), other.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    assert got["nested"] == state["nested"] and torch.equal(got["rng"], state["rng"])
    assert other.lm_head.weight is other.embed.weight


def test_keeps_the_newest_and_cleans_temporaries(tmp_path, model):
    (tmp_path / "checkpoints" / ".step_0000009.tmp-crashed").mkdir(parents=True)
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, model, {"step": step}, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_0000002", "step_0000003"]
    assert not list((tmp_path / "checkpoints").glob(".*"))
    save_checkpoint(tmp_path, 3, model, {"step": 3, "again": True}, keep=2)  # same step: replaced
    assert load_checkpoint(latest_checkpoint(tmp_path), model)["again"] is True


@pytest.mark.parametrize(
    "damage, message",
    [
        (
            lambda p: p.joinpath("model.safetensors").write_bytes(p.joinpath("model.safetensors").read_bytes()[:-100]),
            "truncated",
        ),
        (lambda p: p.joinpath("trainer.pt").unlink(), "missing"),
        (lambda p: p.joinpath("manifest.json").unlink(), "incomplete"),
        (lambda p: p.joinpath("manifest.json").write_text("{"), "corrupt manifest"),
    ],
)
def test_damage_is_detected(tmp_path, model, damage, message):
    path = save_checkpoint(tmp_path, 1, model, {"step": 1}, keep=1)
    verify_checkpoint(path)
    damage(path)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path, model)


def test_a_flipped_byte_is_detected(tmp_path, model):
    path = save_checkpoint(tmp_path, 1, model, {"step": 1}, keep=1)
    f = path / "model.safetensors"
    raw = bytearray(f.read_bytes())
    raw[-10] ^= 0xFF
    f.write_bytes(bytes(raw))
    before = [p.clone() for p in model.parameters()]
    with pytest.raises(CheckpointError, match="sha256 mismatch"):
        load_checkpoint(path, model)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))  # nothing loaded
    assert json.loads((path / "manifest.json").read_text())["step"] == 1


def test_a_checkpoint_folder_is_a_moekit_checkpoint_folder(tmp_path, tiny_model):
    """``moekit.from_pretrained`` reads a training checkpoint as it is (weights, config, tokenizer)."""
    from moekit.interop.pretrained import from_pretrained
    from moekit.training.tokenizer import BPETokenizer

    cfg = tiny_model(aux_free_rate=0.01).replace(tie_embeddings=True)
    model = MoETransformer(cfg).eval()
    model.layers[0].ffn.router.selection_bias.normal_()
    tok = BPETokenizer.train(["def f(x):\n    return x + 1\n"] * 20, 270)
    path = save_checkpoint(tmp_path, 1, model, {"step": 1}, keep=1, tokenizer_json=tok.to_str())
    loaded = from_pretrained(path)
    ids = torch.randint(0, 256, (2, 12))
    assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert loaded.tokenizer.encode("return x") == tok.encode_batch(["return x"])[0]
