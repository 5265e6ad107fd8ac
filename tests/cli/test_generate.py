"""``moekit generate``: streamed text equal to the library's generation, speeds, --json, --chat,
--dtype, and one-line errors (exit 2) for a missing tokenizer, an unknown type, a long prompt."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import moekit
from moekit.cli import main
from moekit.tokenizer import render_chat
from tests.interop.test_run_folder import write_run


@pytest.fixture(autouse=True)
def _one_thread():
    """NOTE: one intra-op thread: these are tiny models, and on a busy shared CPU two OpenMP threads
    that spin waiting for each other made this module ~40x slower (as in tests/training)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["generate", *argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("gen") / "run"
    write_run(path)
    return path


def expected_text(run_dir: Path, prompt: str, n: int, dtype=None) -> str:
    model = moekit.from_pretrained(run_dir, dtype=dtype)
    ids = torch.tensor([list(prompt.encode())])
    out = model.generate(ids, n, temperature=0.0, eos_token_id=[])
    return model.tokenizer.decode(out[0, ids.shape[1] :].tolist())


def test_streams_the_library_text_then_speeds(capsys, run_dir):
    code, out, err = run(capsys, str(run_dir), "--prompt", "def f(", "--max-new-tokens", "12", "--ignore-eos")
    assert code == 0
    assert out == "def f(" + expected_text(run_dir, "def f(", 12) + "\n"
    assert "prefill: 6 tokens" in err and "decode: 12 tokens" in err and err.count("tokens/s") == 2


def test_json(capsys, run_dir):
    code, out, err = run(capsys, str(run_dir), "--prompt", "x = ", "--max-new-tokens", "9", "--ignore-eos", "--json")
    d = json.loads(out)
    assert code == 0 and err == ""
    assert d["prompt_tokens"] == 4 and d["new_tokens"] == 9 and d["text"] == expected_text(run_dir, "x = ", 9)
    assert d["prefill_tokens_per_s"] > 0 and d["decode_tokens_per_s"] > 0 and d["dtype"] == "float32"
    assert len(d["decode_tokens_per_s_by_quarter"]) == 4 and min(d["decode_tokens_per_s_by_quarter"]) > 0


def test_sampling_seed_and_bfloat16(capsys, run_dir):
    argv = [str(run_dir), "--prompt", "ab", "--max-new-tokens", "8", "--ignore-eos", "--json", "--temperature", "1.5"]
    a = json.loads(run(capsys, *argv, "--seed", "3", "--top-p", "0.9")[1])
    b = json.loads(run(capsys, *argv, "--seed", "3", "--top-p", "0.9")[1])
    assert a["text"] == b["text"]
    code, out, _ = run(capsys, str(run_dir), "--prompt", "ab", "--max-new-tokens", "4", "--json", "--dtype", "bfloat16")
    assert code == 0 and json.loads(out)["dtype"] == "bfloat16"


def test_errors_are_one_line(capsys, run_dir, tmp_path):
    code, _, err = run(capsys, str(run_dir), "--prompt", "x" * 60, "--max-new-tokens", "10")
    assert code == 2 and err.count("\n") == 1 and "max_seq_len 64" in err and "60 tokens" in err
    code, _, err = run(capsys, str(run_dir), "--prompt", "x", "--chat")
    assert code == 2 and err.count("\n") == 1 and "no chat template" in err
    moekit.from_pretrained(run_dir).save_pretrained(tmp_path / "hf", format="hf")
    code, _, err = run(capsys, str(tmp_path / "hf"), "--prompt", "x")
    assert code == 2 and err.count("\n") == 1 and "no tokenizer" in err
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    code, _, err = run(capsys, str(tmp_path / "llama"), "--prompt", "x")
    assert code == 2 and err.count("\n") == 1 and "llama" in err


def test_chat_template_renders_as_transformers_does(capsys, run_dir, tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    words = ["[UNK]", "<s>", "</s>", "<|user|>", "<|assistant|>", "hello", "world"]
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["<s>", "</s>"])  # as real tokenizer.json files list them in added_tokens
    template = (
        "{{ bos_token }}{% for m in messages %}{{ '<|' + m['role'] + '|> ' + m['content'] + ' ' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
    )
    folder = tmp_path / "chat"
    moekit.from_pretrained(run_dir).save_pretrained(folder, format="moekit")
    tok.save(str(folder / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": "</s>", "chat_template": template}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    code, out, err = run(capsys, str(folder), "--prompt", "hello world", "--chat", "--max-new-tokens", "3", "--json")
    assert code == 0, err
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    fast.chat_template = template
    want = fast.apply_chat_template([{"role": "user", "content": "hello world"}], add_generation_prompt=True)
    want = want["input_ids"] if hasattr(want, "keys") else want
    assert json.loads(out)["prompt_tokens"] == len(want) == 5
    ours = moekit.load_tokenizer(folder)
    assert ours.encode(render_chat(ours, [{"role": "user", "content": "hello world"}]), False) == want
