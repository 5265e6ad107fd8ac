"""scripts/busy_machine.py's summary: medians over rounds, ratios to idle-1 and the verdict
(the timed runs themselves are the script's job, not a test's)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "busy_machine.py"


def load_script():
    spec = importlib.util.spec_from_file_location("busy_machine", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(case: str, seconds: float, paused: float = 0.0) -> dict:
    return {"case": case, "seconds": seconds, "threads_line": "threads: 1 (x)", "busy_before": 1.0, "paused_s": paused}


def test_summary_ratios_and_verdict():
    script = load_script()
    runs = [run("idle-1", 40.0), run("busy-auto", 50.0), run("idle-1", 44.0), run("busy-auto", 42.0, paused=3.0)]
    result = script.summarise(runs, steps=20)
    assert result["cases"]["idle-1"]["seconds"] == 42.0  # median of 40 and 44
    assert result["cases"]["busy-auto"]["vs_idle_1"] == 46.0 / 42.0
    assert result["busy_auto_vs_idle_1"] == 46.0 / 42.0 and result["meets_target"] is True
    assert result["cases"]["busy-auto"]["paused_s"] == [0.0, 3.0]
    result.update(loadavg=1.0, loadavg_end=2.0)
    text = script.table(result)
    assert "busy-auto / idle-1 = 1.10 (meets the target <= 1.1)" in text and "load average 1.0" in text
    slow = script.summarise([run("idle-1", 40.0), run("busy-auto", 60.0)], steps=20)
    assert slow["meets_target"] is False


def test_wait_policy_variants_compare_against_the_default_run():
    script = load_script()
    runs = [run("idle-1/default", 40.0), run("idle-1/passive", 30.0), run("busy-auto/default", 44.0)]
    result = script.summarise(runs, steps=20)
    assert result["cases"]["idle-1/passive"]["vs_idle_1"] == 0.75
    assert result["busy_auto_vs_idle_1"] == 1.1
    assert script.train_command(Path("/tmp/x"), 20, None, [])[-1] != "--threads"
    assert script.train_command(Path("/tmp/x"), 20, 2, [])[-2:] == ["--threads", "2"]
    env = script.train_env("passive")
    assert env["OMP_WAIT_POLICY"] == "passive" and "MOEKIT_THREADS" not in env
