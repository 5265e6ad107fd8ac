"""``moekit bench --train``: the training FLOPs per token against hand-worked counts, the MFU
arithmetic, one quick run against transformers on the same checkpoint (same step-0 loss), bad
arguments (one line, exit 2) and the CUDA rows (skipped cleanly here, run where there is CUDA)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from moekit.bench_models import LAYER_ROW, deepseek_v3_like, layer_model, qwen3_moe_like
from moekit.cli import main
from moekit.cli.bench_train import devices_for
from moekit.side_by_side import matmul_peak, rotated_rounds
from moekit.train_bench import layer_flops_per_token, mfu, run_train_bench, train_flops_per_token

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_qwen3_like_flops_by_hand():
    """V 512, d 64, 2 layers, 8 heads / 4 KV of 8, 8 experts x 32, top-2, seq 32."""
    q, k, v, o = 64 * 8 * 8, 64 * 4 * 8, 64 * 4 * 8, 8 * 8 * 64
    router, experts = 64 * 8, 2 * 3 * 64 * 32  # the router meets every expert; a token meets top-2
    head = 512 * 64  # the LM head; the input embedding is a lookup, not a matmul
    n = 2 * (q + k + v + o + router + experts) + head
    assert n == 82_944
    attention = 2 * 2 * 32 * 8 * 8 * 2  # forward: 2 (FLOPs per MAC) x 2 (scores, values) x S x H x hd, x 2 layers
    assert train_flops_per_token(qwen3_moe_like(quick=True), 32) == 3 * (2 * n + attention) == 546_816


def test_deepseek_v3_like_flops_by_hand():
    """MLA without q compression (H 8, nope 8, rope 8, v 8, kv_lora 16), layer 0 dense (128 wide),
    layer 1: 16 experts x 16 top-4 + 1 shared, d 64, V 512, seq 32."""
    q = 64 * 8 * (8 + 8)
    kv_a, kv_b = 64 * (16 + 8), 16 * 8 * (8 + 8)
    o = 8 * 8 * 64
    attn = q + kv_a + kv_b + o
    dense = 3 * 64 * 128
    moe = 64 * 16 + 3 * 64 * 16 + 4 * 3 * 64 * 16  # router + shared + top-4 routed
    n = 2 * attn + dense + moe + 512 * 64
    assert n == 105_472
    attention = 2 * 2 * 8 * (16 + 8) * 32  # 2·L·H·(d_qk + d_v)·S, full context
    assert train_flops_per_token(deepseek_v3_like(quick=True), 32) == 3 * (2 * n + attention) == 706_560


def test_layer_flops_by_hand():
    cfg = layer_model()
    assert (cfg.d_model, cfg.moe.n_routed_experts, cfg.moe.expert_ffn_dim, cfg.moe.top_k) == (512, 64, 192, 8)
    assert layer_flops_per_token(cfg.moe, cfg.d_model) == 6 * (512 * 64 + 8 * 3 * 512 * 192) == 14_352_384


def test_mfu_arithmetic():
    # 1 MFLOP per token at 1,000 tokens/s on a 10 GFLOP/s machine uses a tenth of it.
    assert mfu(1e6, 1_000, 1e10) == pytest.approx(0.1)
    assert mfu(6 * 82_944, 2_000, 995_328_000) == pytest.approx(1.0)


def test_matmul_peak_and_rotated_rounds():
    assert 1e8 < matmul_peak(n=256, repeats=2) < 1e13  # FLOP/s of a CPU: plausible, positive
    order = [name for _, name in rotated_rounds(["a", "b", "c"], 4)]
    assert order == ["a", "b", "c", "b", "c", "a", "c", "a", "b", "a", "b", "c"]


def test_quick_json_run_against_transformers(capsys, tmp_path):
    pytest.importorskip("transformers")
    png, saved = tmp_path / "train.png", tmp_path / "rows.json"
    argv = ["bench", "--train", "--quick", "--threads", "1", "--json", "--plot", str(png), "--save", str(saved)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    rows = json.loads(out)
    assert json.loads(saved.read_text()) == rows
    assert [r["model"] for r in rows] == ["qwen3-moe-like", "deepseek-v3-like", LAYER_ROW]
    for r in rows:
        assert r["device"] == "cpu" and r["dtype"] == "float32" and r["threads"] == 1 and r["rounds"] == 1
        assert set(r["hf_ms"]) == {"eager", "grouped_mm"}
        assert r["hf_best_impl"] == min(r["hf_ms"], key=r["hf_ms"].get)
        assert r["ratio_vs_hf"] == pytest.approx(r["moekit_ms"] / r["hf_ms"][r["hf_best_impl"]])
        assert len(r["ratio_rounds"]) == 1
        tokens = r["batch"] * r["seq_len"]
        assert r["moekit_tok_s"] == pytest.approx(tokens / (r["moekit_ms"] / 1e3))
        assert r["moekit_mfu"] == pytest.approx(
            r["train_flops_per_token"] * r["moekit_tok_s"] / (r["peak_tflops"] * 1e12)
        )
        assert r["hf_mfu"] == pytest.approx(r["train_flops_per_token"] * r["hf_tok_s"] / (r["peak_tflops"] * 1e12))
        assert 0 < r["moekit_mfu"] < 1.5 and math.isfinite(r["hf_mfu"])
    for r in rows[:2]:  # same checkpoint, same batch: the same loss before any step
        assert r["kind"] == "train_step" and (r["batch"], r["seq_len"]) == (2, 32)
        assert r["loss_moekit"] == pytest.approx(r["loss_hf"], rel=1e-4)
        assert r["train_flops_per_token"] in (546_816, 706_560)
    assert rows[2]["kind"] == "layer_fwd_bwd" and rows[2]["loss_moekit"] is None and rows[2]["max_abs_diff"] < 1e-4
    assert png.read_bytes().startswith(b"\x89PNG")


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (["--decode"], "choose one"),
        (["--shape", "mixtral-like"], "--model"),
        (["--device", "tpu"], "--device"),
        (["--threads", "0"], "--threads"),
        (["--model", "gpt-2"], "--model"),
    ],
)
def test_bad_arguments_one_line_exit_2(capsys, extra, fragment):
    code = main(["bench", "--train", "--quick", *extra])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err and fragment in lines[0], err


def test_save_refuses_a_file_moekit_did_not_write(capsys, tmp_path):
    mine = tmp_path / "notes.txt"
    mine.write_text("my notes\n")
    code = main(["bench", "--train", "--quick", "--save", str(mine)])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and mine.read_text() == "my notes\n"


def test_cuda_rows_skipped_cleanly_without_cuda(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    devices, line = devices_for("auto")
    assert devices == ["cpu"] and "skipped" in line and "\n" not in line
    assert devices_for("cpu") == (["cpu"], None)
    code = main(["bench", "--train", "--quick", "--device", "cuda"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "CUDA is not available" in lines[0]


@pytest.mark.cuda
@cuda
def test_cuda_bf16_rows_run():
    pytest.importorskip("transformers")
    rows = run_train_bench(["qwen3-moe-like", LAYER_ROW], devices=["cuda"], quick=True, rounds=1)
    assert [r.device for r in rows] == ["cuda", "cuda"] and all(r.dtype == "bf16 autocast" for r in rows)
    assert rows[0].loss_moekit == pytest.approx(rows[0].loss_hf, rel=2e-2)
    assert all(r.moekit_mfu > 0 and r.peak_tflops > 1 for r in rows)


def test_rounds_stop_after_three_once_past_max_seconds(capsys):
    pytest.importorskip("transformers")
    base = ["bench", "--train", "--quick", "--threads", "1", "--json", "--model", LAYER_ROW, "--repeats", "4"]
    for extra, rounds in (([], 4), (["--max-seconds", "0.001"], 3)):
        assert main([*base, *extra]) == 0
        (row,) = json.loads(capsys.readouterr().out)
        assert row["rounds"] == rounds and len(row["ratio_rounds"]) == rounds


def test_every_row_starts_from_the_saved_checkpoint():
    """Rows at several thread counts: each loads the checkpoint afresh (the previous row trained its models)."""
    pytest.importorskip("transformers")
    rows = run_train_bench(["deepseek-v3-like"], threads=[1, 1], quick=True, rounds=1)
    assert len(rows) == 2 and rows[0].loss_moekit == rows[1].loss_moekit == pytest.approx(rows[1].loss_hf, rel=1e-4)
