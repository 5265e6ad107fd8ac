"""transformers as the oracle for a loaded model type: the checks every ``test_hf_parity_<group>.py`` runs.

A group's test module lists tiny random cases (odd widths, every option of the type switched on),
builds each in transformers with wide random weights, saves it (sharded, transformers' own
``save_pretrained``), loads it with ``moekit.from_pretrained`` and runs these checks in fp32:
equal logits, cached decoding equal to one full pass, greedy tokens equal to transformers', a
left-padded batch decoded step by step with transformers' logits,
moekit's own HF folder loading back in transformers with the same logits and tensor names, and
the config surviving HF -> moekit -> HF -> moekit.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from moekit.interop.hf_config import config_from_hf
from moekit.interop.hf_export import to_hf_config
from moekit.interop.pretrained import from_pretrained, read_tensors

VOCAB = 97


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def random_ids(batch: int = 2, t: int = 24, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, t), generator=torch.Generator().manual_seed(seed))


def eager(transformers) -> dict:
    """transformers 5's grouped-mm experts need 16-byte-aligned widths on CPU; the eager loop is the reference."""
    return {"experts_implementation": "eager"} if int(transformers.__version__.split(".")[0]) >= 5 else {}


def build_hf(transformers, model_type: str, seed: int = 0, **kw):
    """A transformers model of ``model_type`` with weights wider than its init (logits spread out)."""
    torch.manual_seed(seed)
    config = transformers.AutoConfig.for_model(model_type, vocab_size=VOCAB, **kw)
    config.bos_token_id = config.eos_token_id = config.pad_token_id = None
    hf = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32, **eager(transformers)).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.15)
        for name, b in hf.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.uniform_(-0.1, 0.1)  # nonzero: selection must add it, weights must not
    return hf


def save_and_load(hf, folder: Path):
    hf.save_pretrained(folder, max_shard_size="100KB")  # sharded, with transformers' own index
    return from_pretrained(folder)


def check_logits(hf, model, tol: float = 1e-5) -> None:
    ids = random_ids()
    with torch.no_grad():
        err = rel_err(model(ids).logits, hf(ids).logits)
    assert err <= tol, f"logits differ from transformers': rel. error {err:.2e} > {tol}"


def check_cached_equals_full(model, t: int = 40) -> None:
    """Prefill 7, a chunk of 4, then single tokens: the logits of one full pass."""
    model.set_moe_impl("loop")  # NOTE: the threaded CPU path costs ~0.4 s per tiny step on a loaded machine
    ids = random_ids(2, t, seed=3)
    cache = model.new_cache(2, t)
    out, start = [], 0
    with torch.no_grad():
        full = model(ids).logits
        for size in [7, 4] + [1] * (t - 11):
            out.append(model(ids[:, start : start + size], cache=cache).logits)
            start += size
    err = rel_err(torch.cat(out, dim=1), full)
    assert err <= 1e-5, f"cached decoding differs from the full forward: {err:.2e}"


def check_greedy(hf, model, n: int = 16) -> None:
    """Greedy tokens equal transformers' (cached on both sides), where its top-2 gap is not a tie."""
    ids = random_ids(batch=1, t=8)
    model.set_moe_impl("loop")
    ours = model.generate(ids, max_new_tokens=n)
    out = hf.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, do_sample=False,
        return_dict_in_generate=True, output_logits=True,
    )  # fmt: skip
    theirs, logits = out.sequences, torch.stack(out.logits, dim=1)
    top2 = logits.topk(2, dim=-1).values[0]
    for i in (ours[0, 8:] != theirs[0, 8:]).nonzero().flatten().tolist():
        assert (top2[i, 0] - top2[i, 1]).item() < 1e-4, f"greedy token {i} differs from transformers'"
        break  # after a tie the continuations legitimately diverge


def check_left_padded_batch(hf, model, n: int = 12) -> None:
    """A left-padded batch (prompts of 11, 5 and 8 tokens) decoded with the cache: teacher-forced on
    transformers' greedy tokens, every step's logits equal transformers' (padding takes no position,
    is never attended to, and counts in the slots that windows and chunks are measured in)."""
    g = torch.Generator().manual_seed(11)
    ids = torch.zeros(3, 11, dtype=torch.long)
    mask = torch.zeros(3, 11, dtype=torch.long)
    for i, length in enumerate((11, 5, 8)):
        ids[i, 11 - length :], mask[i, 11 - length :] = torch.randint(1, VOCAB, (length,), generator=g), 1
    out = hf.generate(
        ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0,
        return_dict_in_generate=True, output_logits=True,
    )  # fmt: skip
    tokens_BN, their_BNV = out.sequences[:, 11:], torch.stack(out.logits, dim=1)
    model.set_moe_impl("loop")
    cache = model.new_cache(3, 11 + n)
    with torch.no_grad():
        steps = [model(ids, cache=cache, attention_mask=mask).logits[:, -1]]
        for i in range(n - 1):
            steps.append(model(tokens_BN[:, i : i + 1], cache=cache).logits[:, -1])
    err = rel_err(torch.stack(steps, dim=1), their_BNV)
    assert err <= 1e-5, f"left-padded decoding differs from transformers': {err:.2e}"


def check_written_folder(transformers, hf, model, theirs: Path, ours: Path, tol: float = 1e-5) -> None:
    """moekit's HF folder loads in transformers with the same logits and transformers' tensor names."""
    model.save_pretrained(ours, format="hf")
    again = transformers.AutoModelForCausalLM.from_pretrained(ours, dtype=torch.float32, **eager(transformers)).eval()
    ids = random_ids()
    with torch.no_grad():
        err = rel_err(again(ids).logits, hf(ids).logits)
    assert err <= tol, f"transformers on moekit's folder: rel. error {err:.2e}"
    a, b = read_tensors(ours, meta=True), read_tensors(theirs, meta=True)
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}


# FP8 block-scaled (DeepSeek-V3, GLM-4.5-FP8, ...) and MXFP4 (gpt-oss) quantisation configs.
QUANTIZATIONS = [
    {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128], "activation_scheme": "dynamic"},
    {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn", "lm_head"]},
]


def check_quantized_refused(folder: Path, tmp: Path, quant: dict) -> None:
    """A quantised copy of ``folder``'s config is refused in one line naming the quantisation."""
    from moekit.interop.types import UnsupportedError

    d = json.loads((folder / "config.json").read_text())
    d["quantization_config"] = quant
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "config.json").write_text(json.dumps(d))
    try:
        from_pretrained(tmp)
    except UnsupportedError as e:
        msg = str(e)
        assert "\n" not in msg and "quantization_config" in msg and quant["quant_method"] in msg, msg
    else:
        raise AssertionError("a quantised checkpoint was loaded")


def check_config_round_trip(model) -> None:
    """HF config -> ModelConfig -> HF config -> the same ModelConfig."""
    cfg = model.config
    back = config_from_hf(to_hf_config(cfg))
    assert back.to_dict() | {"name": ""} == cfg.to_dict() | {"name": ""}


def pair_fixture(cases: dict[str, dict], common: dict):
    """A module's ``pair`` fixture over its ``cases``: (transformers model, moekit model loaded from
    transformers' ``save_pretrained`` folder, that folder)."""

    @pytest.fixture(scope="module", params=sorted(cases))
    def pair(request, tmp_path_factory):
        import transformers

        kw = dict(cases[request.param])
        hf = build_hf(transformers, kw.pop("model_type"), **common, **kw)
        folder = tmp_path_factory.mktemp(request.param)
        return hf, save_and_load(hf, folder), folder

    return pair


class ParityChecks:
    """The checks every group's cases run; a group module subclasses it as ``Test...`` beside its ``pair``."""

    def test_logits_match_transformers(self, pair):
        hf, model, _ = pair
        check_logits(hf, model)

    def test_cached_decoding_equals_full_forward(self, pair):
        check_cached_equals_full(pair[1])

    def test_greedy_generation_matches_transformers(self, pair):
        hf, model, _ = pair
        check_greedy(hf, model)

    def test_left_padded_batch_matches_transformers(self, pair):
        hf, model, _ = pair
        check_left_padded_batch(hf, model)

    def test_moekit_written_hf_folder_loads_in_transformers(self, pair, tmp_path):
        import transformers

        hf, model, folder = pair
        check_written_folder(transformers, hf, model, folder, tmp_path / "out")

    @pytest.mark.parametrize("quant", QUANTIZATIONS, ids=["fp8", "mxfp4"])
    def test_quantized_checkpoints_are_refused_naming_the_quantization(self, pair, quant, tmp_path):
        check_quantized_refused(pair[2], tmp_path, quant)

    def test_config_round_trip(self, pair):
        check_config_round_trip(pair[1])
