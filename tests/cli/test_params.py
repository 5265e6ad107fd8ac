"""``moekit params``: JSON and human output, and one-line errors for bad SPECs (exit 2)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moekit.cli import main

HF_CONFIGS = Path(__file__).parents[1] / "data" / "hf_configs"


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["params", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_json_output(capsys):
    code, out, err = run(capsys, "mixtral-8x7b", "--json")
    assert code == 0 and err == ""
    d = json.loads(out)
    assert d["total"] == 46_702_792_704
    assert d["active"] == 12_879_925_248
    assert d["breakdown"]["embedding"] == d["breakdown"]["lm_head"] == 32000 * 4096
    assert d["flops_per_token"] == d["flops"]["forward_per_token"] > 2 * d["active_conventions"]["no_input_embedding"]
    assert d["weights_bytes"] == {"fp32": 4 * d["total"], "bf16": 2 * d["total"], "fp8": d["total"]}
    assert d["kv_cache_bytes_per_token"] == 32 * 2 * 8 * 128 * 2
    assert d["kv_cache_dtype"] == "bf16"


def test_json_options(capsys):
    _, out, _ = run(capsys, "deepseek-v3", "--json", "--seq-len", "1024", "--dtype", "fp16", "--causal")
    d = json.loads(out)
    assert d["flops"]["seq_len"] == 1024 and d["flops"]["attention_context"] == "causal"
    assert d["kv_cache_bytes_per_token"] == 61 * (512 + 64) * 2
    assert d["weights_bytes"]["fp16"] == 2 * d["total"]


def test_hf_config_file_and_folder(capsys, tmp_path):
    code, out, _ = run(capsys, str(HF_CONFIGS / "qwen1.5-moe-a2.7b.json"), "--json")
    assert code == 0 and json.loads(out)["total"] == 14_315_784_192
    (tmp_path / "config.json").write_text((HF_CONFIGS / "olmoe-1b-7b-0924.json").read_text())
    code, out, _ = run(capsys, str(tmp_path), "--json")
    assert code == 0 and json.loads(out)["total"] == 6_919_161_856


def test_human_output_has_table_and_formula(capsys):
    code, out, _ = run(capsys, "deepseek-moe-16b")
    assert code == 0
    assert "routed_experts" in out and "lm_head" in out
    assert "16,375,728,128" in out  # the total, in the table and the formula
    assert "27 MoE layers × 64 experts × (w1,w3,w2 3·2048·1408)" in out
    assert "KV cache" in out


@pytest.mark.parametrize(
    "spec, content, message",
    [
        ("missing.json", None, "config file .*missing.json does not exist"),
        ("bad.json", "{oops", "not valid JSON"),
        ("bert.json", '{"model_type": "bert"}', "unsupported model_type 'bert'"),
        ("nope-preset", None, "unknown preset 'nope-preset'"),
    ],
)
def test_bad_spec_is_one_line_exit_2(capsys, tmp_path, spec, content, message):
    import re

    path = tmp_path / spec
    if content is not None:
        path.write_text(content)
    arg = spec if spec == "nope-preset" else str(path)
    code, out, err = run(capsys, arg)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert err.startswith("moekit params: error: ") and re.search(message, err)


def test_bad_seq_len_is_a_usage_error(capsys):
    assert main(["params", "tiny", "--seq-len", "0"]) == 2
    err = capsys.readouterr().err
    assert "--seq-len" in err and len(err.strip().splitlines()) == 1


PUBLISHED = Path(__file__).parents[1] / "data" / "published_configs"


def test_mtp_is_reported_apart_and_added_on_request(capsys):
    _, out, _ = run(capsys, str(PUBLISHED / "glm-4.5.json"), "--json")
    d = json.loads(out)
    assert d["outside_total"] == ["mtp"] and d["breakdown"]["mtp"] > 0
    _, out, _ = run(capsys, str(PUBLISHED / "glm-4.5.json"), "--json", "--mtp")
    assert json.loads(out)["total"] == d["total"] + d["breakdown"]["mtp"]
    _, out, _ = run(capsys, str(PUBLISHED / "glm-4.5.json"))
    assert "mtp *" in out and "* not in the total: multi-token-prediction modules" in out


def test_hybrid_rows_and_quantised_bytes_in_the_table(capsys):
    code, out, _ = run(capsys, str(PUBLISHED / "qwen3-next-80b-a3b.json"))
    assert code == 0 and "linear_attention" in out and "12 layers ×" not in out.split("formula")[0]
    _, out, _ = run(capsys, str(PUBLISHED / "kimi-k2-instruct.json"))
    assert "stored checkpoint (fp8 e4m3 blocks 128x128, scales included)" in out


def test_generic_path_says_what_it_does_not_know(capsys, tmp_path):
    pytest.importorskip("transformers")
    import transformers

    transformers.AutoConfig.for_model("cohere2_moe", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=32, vocab_size=100).save_pretrained(tmp_path)  # fmt: skip
    code, out, _ = run(capsys, str(tmp_path))
    assert code == 0 and "KV cache / token (bf16)" in out and "n/a (attention layers not known)" in out
    assert "counted from transformers' Cohere2MoeForCausalLM on the meta device" in out
    d = json.loads(run(capsys, str(tmp_path), "--json")[1])
    assert d["kv_cache_bytes_per_token"] is None and d["flops"]["attention_per_token"] is None
