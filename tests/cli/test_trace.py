"""``moekit trace``: the table, --json, the PNG, --data, and one-line errors; in-process through ``main``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

import moekit
from moekit.accounting import count_params
from moekit.cli import main

sys.path.insert(0, str(Path(__file__).parents[1] / "interop"))
from test_run_folder import write_run  # noqa: E402


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("trace") / "run"
    write_run(path)
    return path


def test_table_json_and_png(capsys, run_dir, tmp_path):
    png = tmp_path / "trace.png"
    assert main(["trace", str(run_dir), "--text", "def f(x):", "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    model = moekit.from_pretrained(run_dir)
    active = count_params(model.config).active
    assert "layer 0" in out and "layer 1" in out and f"{active:,}" in out and "Plot written" in out
    assert png.read_bytes().startswith(b"\x89PNG")
    assert main(["trace", str(run_dir), "--text", "def f(x):", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert [t["text"] for t in d["tokens"]] == list("def f(x):")
    assert all(t["touched_params"] == active == d["active_params"] for t in d["tokens"])
    assert all(len(c["experts"]) == 2 for t in d["tokens"] for c in t["layers"])


def test_data_reports_expert_load(capsys, run_dir, tmp_path):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text("hello world " * 40)
    png = tmp_path / "load.png"
    assert main(["trace", str(run_dir), "--data", str(tmp_path / "corpus"), "--json", "--plot", str(png)]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["tokens"] == 480 and [x["layer"] for x in d["layers"]] == [0, 1]
    assert all(sum(x["counts"]) == 480 * 2 for x in d["layers"])
    assert png.read_bytes().startswith(b"\x89PNG")


def test_errors_are_one_line(capsys, run_dir, tmp_path):
    assert main(["trace", str(tmp_path / "missing"), "--text", "x"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "moekit trace: error:" in err
    assert main(["trace", str(run_dir), "--text", ""]) == 2
    assert "no tokens" in capsys.readouterr().err
    (tmp_path / "mine.png").write_text("not moekit's")
    assert main(["trace", str(run_dir), "--text", "x", "--plot", str(tmp_path / "mine.png")]) == 2
    assert (tmp_path / "mine.png").read_text() == "not moekit's"
