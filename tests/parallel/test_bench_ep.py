"""``moekit bench --ep``: its report and its input checks (the timed runs spawn processes, which
the torchrun tests already exercise; the bytes it reports are checked in test_equivalence)."""

from __future__ import annotations

import pytest

from moekit.config import ConfigError
from moekit.parallel.bench import EPBenchResult, format_report, run_ep_bench


def result(processes: int, threads: int, cores: int, step_ms: float) -> EPBenchResult:
    a2a = [1024.0, 2048.0] if processes > 1 else []
    return EPBenchResult(
        processes, {"dp": processes, "ep": processes, "etp": 1}, threads, cores, step_ms, 1.0, a2a, a2a
    )


def test_report_says_when_processes_outnumber_cores():
    text = format_report([result(1, 2, 2, 100.0), result(4, 1, 2, 150.0)])
    assert "step time 4 processes / 1 process: 1.50" in text
    assert "oversubscription" in text
    assert "1 2" in text  # KiB per layer
    fair = format_report([result(1, 2, 2, 100.0), result(2, 1, 2, 80.0)])
    assert "oversubscription" not in fair
    assert "compare with --threads 1" in fair  # different thread counts are called out


@pytest.mark.parametrize("ep", [3, 32])
def test_bad_ep_is_rejected_before_spawning(ep):
    with pytest.raises(ConfigError, match="ep"):
        run_ep_bench(ep)


def test_save_replaces_only_bench_rows_and_is_checked_before_spawning(tmp_path, capsys):
    import json

    from moekit import files
    from moekit.cli import main

    ours = tmp_path / "ep.json"
    ours.write_text(json.dumps([result(1, 2, 2, 100.0).to_dict(), result(2, 1, 2, 80.0).to_dict()]))
    assert files.is_moekit_file(ours)  # bench --ep rows may be replaced by the next bench --ep
    user = tmp_path / "user.json"
    user.write_text('[{"step_ms": 1}]')
    assert main(["bench", "--ep", "2", "--save", str(user)]) == 2
    assert "was not written by moekit" in capsys.readouterr().err
    assert user.read_text() == '[{"step_ms": 1}]'
    assert main(["bench", "--ep", "2", "--plot", str(tmp_path / "p.png")]) == 2
    assert "--plot" in capsys.readouterr().err
