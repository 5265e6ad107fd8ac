"""``moekit train / eval / plot`` end to end, and bad input ending in one clear error line."""

from __future__ import annotations

import json

import pytest

from moekit.cli import main

# A tiny byte-level model; every CLI run below takes a second or two.
TINY = [
    "--preset", "tiny",
    "--set", "train.tokenizer=byte",
    "--set", "d_model=32",
    "--set", "n_layers=2",
    "--set", "attention.n_heads=2",
    "--set", "attention.n_kv_heads=2",
    "--set", "attention.head_dim=16",
    "--set", "moe.expert_ffn_dim=16",
    "--set", "moe.shared_ffn_dim=16",
    "--set", "train.batch_size=2",
    "--set", "train.seq_len=32",
    "--set", "train.eval_batches=1",
    "--set", "train.log_every=1",
]  # fmt: skip


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("moekit train: error: ") or lines[0].startswith("moekit eval: error: "), err
    return lines[0]


def test_train_eval_plot(tmp_path, text_dir, capsys):
    out = tmp_path / "run"
    assert main(["train", *TINY, "--data", str(text_dir), "--steps", "3", "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "val loss" in printed and "active" in printed
    for name in ("config.json", "metrics.jsonl", "summary.json", "checkpoints/step_0000003/model.safetensors"):
        assert (out / name).is_file()
    assert not (out / "tokenizer.json").exists()  # byte runs have nothing to save
    config = json.loads((out / "config.json").read_text())
    assert config["model"]["vocab_size"] == 256 and config["train"]["data"] == str(text_dir)
    assert main(["eval", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["step"] == 3 and result["val_loss"] == pytest.approx(
        json.loads((out / "summary.json").read_text())["val_loss"]
    )
    assert main(["plot", str(out)]) == 0
    assert (out / "loss.png").stat().st_size > 1000 and (out / "expert_load.png").stat().st_size > 1000


def test_resume_continues_to_more_steps(tmp_path, text_dir, capsys):
    out = str(tmp_path / "run")
    assert main(["train", *TINY, "--data", str(text_dir), "--steps", "2", "--out", out, "--quiet"]) == 0
    assert main(["train", "--resume", "--steps", "4", "--out", out, "--quiet"]) == 0
    assert [json.loads(line)["step"] for line in open(f"{out}/metrics.jsonl")] == [1, 2, 3, 4]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--set", "moe.top_kk=4"], "unknown config key 'moe.top_kk'"),
        (["--set", "train.lrr=0.1"], "unknown config key 'train.lrr'"),
        (["--set", "moe.top_k=four"], "moe.top_k must be an integer, got 'four'"),
        (["--set", "train.lr=fast"], "train.lr must be a number, got 'fast'"),
        (["--set", "moe.top_k"], "--set expects key=value"),
        (["--steps", "0"], "train.steps must be a positive number"),
        (["--preset", "nope"], "unknown preset 'nope'"),
    ],
)
def test_bad_settings_are_one_clear_line(tmp_path, text_dir, capsys, args, message):
    argv = ["train", *TINY, "--data", str(text_dir), "--steps", "2", "--out", str(tmp_path / "r"), *args]
    assert main(argv) == 2
    assert message in _error_line(capsys)
    assert not (tmp_path / "r").exists()  # refused before anything was written


def test_bad_data_is_one_clear_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["train", *TINY, "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "r1")]) == 2
    assert f"data folder {tmp_path / 'empty'} is empty" in _error_line(capsys)
    binary = tmp_path / "weights.bin"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe")
    assert main(["train", *TINY, "--data", str(binary), "--out", str(tmp_path / "r2")]) == 2
    assert f"data file {binary} is not UTF-8 text" in _error_line(capsys)


def test_output_folder_of_a_different_run_is_one_clear_line(tmp_path, text_dir, capsys):
    out = str(tmp_path / "run")
    base = ["train", *TINY, "--data", str(text_dir), "--steps", "1", "--out", out, "--quiet"]
    assert main(base) == 0
    capsys.readouterr()
    before = (tmp_path / "run" / "metrics.jsonl").read_text()
    assert main([*base, "--set", "moe.top_k=2"]) == 2
    assert "holds a different run (model.moe.top_k: 4 -> 2)" in _error_line(capsys)
    assert main([*base, "--set", "moe.top_k=2", "--resume"]) == 2
    assert "holds a different run" in _error_line(capsys)
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == before


def test_truncated_checkpoint_is_one_clear_line(tmp_path, text_dir, capsys):
    out = tmp_path / "run"
    assert main(["train", *TINY, "--data", str(text_dir), "--steps", "2", "--out", str(out), "--quiet"]) == 0
    capsys.readouterr()
    weights = out / "checkpoints" / "step_0000002" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert main(["eval", str(out)]) == 2
    assert f"checkpoint file {weights} is truncated or corrupt" in _error_line(capsys)
    assert main(["train", "--resume", "--steps", "3", "--out", str(out), "--quiet"]) == 2
    assert "is truncated or corrupt" in _error_line(capsys)
