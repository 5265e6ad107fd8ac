"""``moekit plan``: the DeepSeek-V3 tables, --json with every figure, and one-line errors (exit 2)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from moekit.cli import main

HF_CONFIGS = Path(__file__).parents[1] / "data" / "hf_configs"


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["plan", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_deepseek_v3_training_table(capsys):
    code, out, err = run(capsys, "deepseek-v3", "--devices", "64", "--device-memory", "80GiB", "--train")
    assert code == 0 and err == ""
    assert "deepseek-v3: training on 64 × 80.00 GiB" in out
    for header in ("dp·ep·etp", "weights", "grads+optim", "activations", "a2a/step", "ETP AR/step", "comm/token"):
        assert header in out
    # Nothing fits, so the leanest layout ranks first: every expert sliced 64 ways.
    assert re.search(r"│ +1 │ 1·1·64 +│ +256 │", out) and re.search(r"│ +\d+ │ 64·64·1 +│ +4 │", out)
    assert "nothing fits" in out and "pipeline parallelism" in out
    assert "16 B/param" in out  # the regime is stated


def test_deepseek_v3_inference_table(capsys):
    code, out, _ = run(capsys, "deepseek-v3", "--devices", "64", "--device-memory", "80GiB", "--infer")
    assert code == 0
    assert "KV cache" in out and "grad AR/step" not in out
    assert re.search(r"best: dp64·ep64·etp1, [\d.]+ GiB of 72.00 GiB usable", out)


def test_json_has_every_figure(capsys):
    code, out, _ = run(capsys, "mixtral-8x7b", "--devices", "8", "--infer", "--json", "--seq-len", "2048")
    assert code == 0
    d = json.loads(out)
    assert d["request"] == {
        "devices": 8,
        "device_memory": 80 * 2**30,
        "mode": "infer",
        "dtype": "bf16",
        "micro_batch": 1,
        "seq_len": 2048,
        "headroom": 0.1,
        "zero3": False,
        "recompute": False,
        "experts_impl": "rows",
        "attention_kernel": "flash",
    }
    # 8 experts of width 14336 on 8 devices: etp ∈ {1, 2, 4, 8}, ep | dp and ep | 8.
    assert len(d["layouts"]) == 4 + 3 + 2 + 1
    for row in d["layouts"]:
        assert row["total"] == sum(row["memory"].values())
        assert row["fits"] == (row["total"] <= 0.9 * 80 * 2**30)
        assert row["memory"]["kv_cache"] == 2048 * 32 * 2 * 8 * 128 * 2
    assert d["fits"] and d["best"] == d["layouts"][0]["layout"]["name"]


def test_hf_config_spec_and_fixed_degrees(capsys):
    spec = str(HF_CONFIGS / "qwen1.5-moe-a2.7b.json")
    code, out, _ = run(capsys, spec, "--devices", "4", "--ep", "4", "--json", "--micro-batch", "2", "--seq-len", "512")
    assert code == 0
    d = json.loads(out)
    assert [row["layout"]["name"] for row in d["layouts"]] == ["dp4·ep4·etp1"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["deepseek-v3", "--devices", "8", "--device-memory", "80XB"], "device memory must look like 80GiB"),
        (["deepseek-v3", "--devices", "8", "--dtype", "fp8", "--train"], "dtype 'fp8' cannot be used to train"),
        (["deepseek-v3", "--devices", "8", "--dtype", "int4"], "unknown dtype 'int4'"),
        (["deepseek-v3", "--devices", "8", "--ep", "3"], "no layout of 8 devices has ep=3"),
        (["deepseek-v3", "--devices", "8", "--headroom", "2"], r"headroom must be a fraction in \[0, 1\)"),
        (["no-such-model", "--devices", "8"], "unknown preset 'no-such-model'"),
        (["missing.json", "--devices", "8"], "config file missing.json does not exist"),
    ],
)
def test_bad_input_is_one_line_exit_2(capsys, argv, message):
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert err.startswith("moekit plan: error: ") and re.search(message, err)
