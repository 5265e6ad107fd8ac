"""``moekit bench --decode``: the roofline's bytes per token from the accounting, and one quick run in
which transformers, loading the same saved checkpoint, decodes the same greedy tokens as moekit."""

from __future__ import annotations

import json

import pytest

from moekit.cli import main
from moekit.decode_bench import QUICK_DECODE_MODELS, _Clock, weight_bytes


@pytest.mark.parametrize("name", list(QUICK_DECODE_MODELS))
def test_weight_bytes_by_hand(name):
    """Always-active bytes = every module outside the routed experts, less the embedding matrix, plus
    one embedding row; the routed part = distinct experts x one expert's 3·D·F weights x layers."""
    from moekit.models import MoETransformer
    from moekit.tracing import module_counts

    cfg = QUICK_DECODE_MODELS[name]()
    always_params, per_expert = module_counts(MoETransformer(cfg))
    always, routed = weight_bytes(cfg, distinct_experts_per_layer=5.5)
    assert always == 4 * (always_params - cfg.vocab_size * cfg.d_model + cfg.d_model)
    assert per_expert == 3 * cfg.d_model * cfg.moe.expert_ffn_dim
    assert routed == pytest.approx(4 * len(cfg.moe_layer_ids) * 5.5 * per_expert)


def test_clock_counts_decode_steps_only():
    import torch

    clock = _Clock(2)
    clock.put(torch.zeros(2, 16))  # transformers puts the prompt first: ignored
    for t in (1.0, 1.5, 2.0):
        clock.put(torch.zeros(2))
        clock.stamps[-1], clock.cpu_stamps[-1] = t, t / 4  # a quarter of the wall time on a core
    assert clock.tokens_per_s() == pytest.approx(2 * 2 / 1.0)
    assert clock.tokens_per_s(cpu=True) == pytest.approx(2 * 2 / 0.25)


def test_quick_decode_run_agrees_with_transformers(capsys, tmp_path):
    pytest.importorskip("transformers")
    png = tmp_path / "decode.png"
    argv = ["bench", "--decode", "--quick", "--model", "qwen3-moe-like", "--batch", "1", "--batch", "2"]
    assert main([*argv, "--threads", "1", "--json", "--plot", str(png)]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["batch"] for r in rows] == [1, 2]
    for r in rows:
        assert r["same_tokens"] == 1.0  # same checkpoint, same greedy tokens
        assert set(r["hf_tok_s"]) == {"eager", "grouped_mm"}
        assert len(r["ratio_rounds"]) == 1
        assert r["ratio_vs_hf"] == pytest.approx(r["moekit_tok_s"] / max(r["hf_tok_s"].values()))
        assert r["cpu_ratio_vs_hf"] == pytest.approx(r["moekit_cpu_tok_s"] / max(r["hf_cpu_tok_s"].values()))
        assert set(r["hf_cpu_tok_s"]) == set(r["hf_tok_s"]) and r["moekit_cpu_tok_s"] > 0
        assert r["roofline_tok_s"] == pytest.approx(r["read_gb_s"] * 1e9 / r["weight_bytes_per_token"])
        assert r["threads"] == 1 and r["read_gb_s"] > 0
    assert rows[0]["distinct_experts_per_layer"] == 4  # batch 1: exactly top_k
    assert 4 <= rows[1]["distinct_experts_per_layer"] <= 8
    assert png.read_bytes().startswith(b"\x89PNG")
