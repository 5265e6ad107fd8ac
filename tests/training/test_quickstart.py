"""``moekit quickstart`` prints accounting, validation loss, plot paths and a sample."""

from __future__ import annotations

import json

from moekit.cli import main
from moekit.cli.quickstart import wall_time


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
    assert printed.rstrip().splitlines()[-1].startswith("quickstart finished in ")  # its wall time, last
    wall = json.loads((out / "summary.json").read_text())["quickstart_wall_s"]
    assert printed.rstrip().endswith(f"finished in {wall_time(wall)}")
    log = (out / "train.log").read_text().splitlines()
    assert "quickstart: starting at step 0 of 2" in log[0] and log[-1].endswith(f"finished in {wall_time(wall)}")
    assert main(["quickstart", "--steps", "3", "--out", str(out)]) == 0  # a second run continues the first
    assert [line.count('"step": ') for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 1, 1]


def test_wall_time_reads_as_people_say_it():
    assert [wall_time(t) for t in (0.4, 48.4, 60, 92.2, 119.6, 3599, 3720)] == [
        "0 s",
        "48 s",
        "1 min 0 s",
        "1 min 32 s",
        "2 min 0 s",
        "59 min 59 s",
        "1 h 02 min",
    ]
