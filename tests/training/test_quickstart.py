"""``moekit quickstart`` prints accounting, validation loss, plot paths and a sample."""

from __future__ import annotations

from moekit.cli import main


def test_quickstart_reports_and_continues(tmp_path, text_dir, tiny_run, tiny_model, capsys, monkeypatch):
    # The real one trains the "tiny" preset on the whole standard library for ~2 minutes; the
    # same command on a seconds-long byte-level config exercises everything it prints.
    monkeypatch.setattr(
        "moekit.cli.quickstart.quickstart_config",
        lambda steps: tiny_run(text_dir, tiny_model(n_shared_experts=1), steps=steps, eval_every=2),
    )
    out = tmp_path / "qs"
    assert main(["quickstart", "--steps", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "active per token" in printed and "FLOPs/token" in printed
    assert "validation loss" in printed and "uniform guess" in printed
    assert f"plot: {out / 'loss.png'}" in printed and f"plot: {out / 'expert_load.png'}" in printed
    assert "sample:\n    import os" in printed
    assert main(["quickstart", "--steps", "3", "--out", str(out)]) == 0  # a second run continues the first
    assert [line.count('"step": ') for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 1, 1]
