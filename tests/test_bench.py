"""``moekit bench --quick``: the JSON schema, positive numbers, the table and the plot (no timing asserts)."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from moekit.bench import QUICK_SHAPES, SHAPES, peak_extra_bytes, run_bench
from moekit.cli import main

REQUIRED = {
    "shape": str,
    "tokens": int,
    "pass": str,
    "moekit_ms": float,
    "reference_ms": float,
    "dense_ms": float,
    "ratio_vs_dense": float,
    "speedup_vs_reference": float,
    "moekit_peak_mib": float,
    "reference_peak_mib": float,
    "dense_peak_mib": float,
    "memory_vs_dense": float,
    "moekit_tflops": float,
    "dense_tflops": float,
    "moekit_weights_read_mib": float,
    "dense_weights_mib": float,
    "repeats": int,
    "impl": str,
    "threads": int,
}


@pytest.fixture(scope="module")
def quick_rows() -> list[dict]:
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        # One thread: on a busy machine tiny ops at 2 threads crawl (OpenMP spin-waits), and only
        # the schema is checked here.
        assert main(["bench", "--quick", "--json", "--repeats", "1", "--device", "cpu", "--threads", "1"]) == 0
    return json.loads(out.getvalue())


def test_quick_json_schema_and_positive_numbers(quick_rows):
    shapes = {s.name: s for s in QUICK_SHAPES.values()}
    expected = {(name, t, p) for name, s in shapes.items() for t in s.tokens for p in ("forward", "forward_backward")}
    assert {(r["shape"], r["tokens"], r["pass"]) for r in quick_rows} == expected
    for row in quick_rows:
        for key, kind in REQUIRED.items():
            assert isinstance(row[key], kind), (key, row[key])
            if kind is float or key in ("tokens", "repeats", "threads"):
                assert row[key] > 0 and math.isfinite(row[key]), (key, row)
        assert row["ratio_vs_dense"] == pytest.approx(row["moekit_ms"] / row["dense_ms"])
        assert row["speedup_vs_reference"] == pytest.approx(row["reference_ms"] / row["moekit_ms"])
        assert row["impl"] == "fused" and row["device"] == "cpu" and row["dtype"] == "float32"
        assert row["threads"] == 1


def test_dense_equivalent_has_the_moe_flops_per_token():
    for shape in [*SHAPES.values(), *QUICK_SHAPES.values()]:
        moe = shape.moe
        assert shape.dense_ffn_dim == (moe.top_k + moe.n_shared_experts) * moe.expert_ffn_dim
    assert [s.moe.n_routed_experts for s in SHAPES.values()] == [8, 64, 256]
    assert [s.moe.top_k for s in SHAPES.values()] == [2, 6, 8]
    assert [s.moe.n_shared_experts for s in SHAPES.values()] == [0, 2, 1]
    assert all(s.tokens == (2048, 64) for s in SHAPES.values())


def test_human_table_and_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    png = tmp_path / "bench.png"
    args = ["bench", "--quick", "--repeats", "1", "--shape", "mixtral-like", "--no-memory", "--threads", "1"]
    args += ["--plot", str(png)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "mixtral-like" in out and "moekit/dense" in out and "include the router" in out
    assert "deepseek-v3-like" not in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_peak_extra_bytes_sees_a_temporary_and_skips_gradients():
    w = torch.nn.Parameter(torch.randn(256, 256))
    x = torch.randn(64, 256)

    def temporary():
        (torch.ones(1024, 256) * 2).sum()  # 1 MiB live at once, twice over for the product

    assert peak_extra_bytes(temporary, [w], torch.device("cpu")) >= 2**20
    peak = peak_extra_bytes(lambda: (x @ w).sum().backward(), [w], torch.device("cpu"))
    assert peak is not None and peak < w.numel() * 4  # w.grad, still held, is not counted


def test_run_bench_rejects_unknown_pass():
    from moekit.errors import MoekitError

    with pytest.raises(MoekitError, match="unknown pass"):
        run_bench(QUICK_SHAPES.values(), repeats=1, passes=["backward"])


def test_default_run_leaves_out_the_slow_parts():
    """Without --full: decode-sized batches forward only, no reference forward+backward, no reference memory."""
    shape = QUICK_SHAPES["mixtral-like"]
    small = dataclasses.replace(shape, tokens=(128, 8))
    rows = run_bench([small], repeats=1, device="cpu", full=False)
    assert [(r.tokens, r.pass_) for r in rows] == [(128, "forward"), (128, "forward_backward"), (8, "forward")]
    for r in rows:
        assert r.moekit_ms > 0 and r.dense_ms > 0 and r.moekit_peak_mib is not None and r.reference_peak_mib is None
        timed = r.pass_ == "forward"
        assert (r.reference_ms is not None) == timed and (r.speedup_vs_reference is not None) == timed


def test_default_run_times_a_slow_reference_once(monkeypatch):
    import moekit.bench
    import moekit.layers.moe

    calls = []
    reference = moekit.layers.moe.reference_routed
    monkeypatch.setattr(moekit.layers.moe, "reference_routed", lambda *a: calls.append(1) or reference(*a))
    monkeypatch.setattr(moekit.bench, "SLOW_REFERENCE_S", 0.0)  # every reference call counts as slow
    small = dataclasses.replace(QUICK_SHAPES["mixtral-like"], tokens=(8,))
    (row,) = run_bench([small], repeats=3, device="cpu", full=False)
    assert len(calls) == 1 and row.reference_ms > 0 and row.repeats == 3  # moekit and dense: every round
