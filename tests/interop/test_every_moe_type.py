"""Acceptance: ``moekit params`` on every decoder-only causal-LM MoE type of the pinned transformers.

The types are found programmatically (transformers' causal-LM auto mapping, kept when the model
built from a small config holds routed experts). For each, a small random config is written by
transformers itself (``save_pretrained``), and ``moekit params --json`` on that folder must give
exactly the parameter count of transformers' model built on the meta device. Types with a native
reader must also agree with the generic path (module tree) on the active count.
"""

from __future__ import annotations

import json
import random
import sys
import warnings

import pytest
import torch

from moekit.cli import main

transformers = pytest.importorskip("transformers")
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES  # noqa: E402

from moekit.interop.hf_generic import count_with_transformers  # noqa: E402
from moekit.interop.types import TYPES  # noqa: E402

transformers.logging.set_verbosity_error()

# Shared small sizes; each type keeps only the keys its config has.
SMALL = dict(
    hidden_size=64,
    intermediate_size=96,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    vocab_size=128,
    max_position_embeddings=256,
    pad_token_id=0,
)
N_EXPERT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
TOP_K_KEYS = ("num_experts_per_tok", "moe_topk", "moe_k", "num_experts_per_token")
WIDTH_KEYS = ("moe_intermediate_size", "expert_ffn_hidden_size")

# What a type's small config needs beyond SMALL to build (its defaults are inconsistent, or the
# random expert count must respect a constraint).
OVERRIDES: dict[str, dict] = {
    "deepseek_v2": dict(num_experts_per_tok=2),  # the default top-k is None
    "dbrx": dict(
        d_model=64, n_heads=4, n_layers=2, max_seq_len=256,
        attn_config=dict(kv_n_heads=2, rope_theta=10000.0),
        ffn_config=dict(ffn_hidden_size=32, moe_num_experts=4, moe_top_k=2),
    ),
    "dots1": dict(n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1),
    "dots3_note_text": dict(num_key_value_heads=4),
    "hunyuan_v1_moe": dict(num_experts=4, moe_topk=2),
    # PhiMoE's sparsemixer routes to two experts whatever num_experts_per_tok says (transformers'
    # too); the module-tree count takes the config's top-k, so the cross-check needs the true one.
    "phimoe": dict(num_experts_per_tok=2),
    # Gemma 4 and Doge are dense unless asked for their MoE blocks.
    "gemma4_text": dict(enable_moe_block=True, num_experts=4, top_k_experts=2, moe_intermediate_size=32),
    "doge": dict(is_moe=True, num_experts=16, num_experts_per_tok=2),
    "zaya": dict(num_experts_per_tok=1),  # "ZAYA currently supports num_experts_per_tok=1 only"
    "lfm2_moe": dict(num_hidden_layers=3, num_dense_layers=1, layer_types=["conv", "full_attention", "conv"]),
    "qwen4_exp": dict(text_config=dict(
        indexer_n_heads=2, indexer_kv_heads=1, indexer_head_dim=256, indexer_budget=64, indexer_compress_ratio=4,
    )),
}  # fmt: skip

# The MoE types of transformers 5.24 (the dev extra pins it); a new release changes this list
# on purpose, not silently.
EXPECTED_TYPES = {
    "afmoe", "aria_text", "axk1", "axk2", "bailing_hybrid", "cohere2_moe", "dbrx", "deepseek_v2", "deepseek_v3",
    "deepseek_v32", "deepseek_v4", "dots1", "dots3_note", "dots3_note_text", "ernie4_5_moe", "exaone_moe",
    "flex_olmo", "flint", "gemma4_text", "glm4_moe", "glm4_moe_lite", "glm_moe_dsa", "gpt_oss", "granitemoe",
    "granitemoe_swa", "granitemoehybrid", "granitemoeshared", "hunyuan_v1_moe", "hy_v3", "hy_v4",
    "inkling2_loop_text", "inkling2_text", "inkling_text", "jamba", "jetmoe", "kimi_linear", "kolibri1", "laguna",
    "lara_mini", "lfm2_moe", "llama4", "llama4_text", "longcat_flash", "mellum", "mimo_v2_flash", "minimax",
    "minimax_m2", "minimax_m3_vl_text", "mixtral", "nemotron_h", "olmoe", "phimoe", "qwen2_moe", "qwen3_5_moe",
    "qwen3_5_moe_text", "qwen3_moe", "qwen3_next", "qwen4_exp", "qwen4_exp_text", "sarvam_mla", "sarvam_moe",
    "solar_open", "zaya",
}  # fmt: skip

# Types whose config names experts that moekit cannot count, and why (also in the README).
UNSUPPORTED = {
    # transformers 5.24 cannot instantiate its own default config (nor a small one).
    "gemma4_assistant": "transformers 5.24 rejects its default config: hidden_size_per_layer_input must be 0",
    # Doge's "cross-domain MoE" experts are rows of two embedding tables picked by product keys:
    # no experts module and no per-expert weights, so there is nothing to take top_k / E of.
    "doge": "experts are embedding rows picked by product keys: no expert weights to classify",
}

# moekit's count of a type differs from transformers' on purpose (the reason in each entry).
KNOWN_DIFFERENCE: dict = {
    # transformers 5.24 allocates the fused gate_up_proj for the zero-computation experts too
    # ([E + Z, 2F, d]); they have no weights (the published checkpoints hold E of them).
    "longcat_flash": lambda c: c.num_layers * c.zero_expert_num * 2 * c.expert_ffn_hidden_size * c.hidden_size,
}


def _none(cfg) -> int:
    return 0


def small_config(mt: str):
    """A small random config of type ``mt`` (seeded by the type's name)."""
    rng = random.Random(mt)
    defaults = AutoConfig.for_model(mt).to_dict()
    kw = {k: v for k, v in SMALL.items() if k in defaults}
    if "num_hidden_layers" in defaults:
        kw["num_hidden_layers"] = rng.choice([2, 3, 4])
    e = rng.choice([4, 6, 8])
    for key in N_EXPERT_KEYS:
        if isinstance(defaults.get(key), int):
            kw[key] = e
    for key in TOP_K_KEYS:
        if isinstance(defaults.get(key), int):
            kw[key] = rng.choice([1, 2, 3])
    if isinstance(defaults.get("first_k_dense_replace"), int):  # DeepSeek-style: keep an MoE layer
        kw["first_k_dense_replace"] = 1
    if isinstance(defaults.get("n_group"), int):  # groups must divide the experts
        kw.update(n_group=2, topk_group=1)
    for key in WIDTH_KEYS:
        if isinstance(defaults.get(key), int):
            kw[key] = rng.choice([16, 32, 48])
    kw.update(OVERRIDES.get(mt, {}))
    return AutoConfig.for_model(mt, **kw)


def meta_model(cfg):
    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_config(cfg)


def expert_keys(d: dict) -> bool:
    """Does a config dict (or a nested one) name experts at all?"""
    return any("expert" in str(k) or (isinstance(v, dict) and expert_keys(v)) for k, v in d.items())


def has_routed_experts(cfg, model) -> bool:
    """Independent of moekit's classifier: an ``experts`` module, or stacked ``[E, ...]`` weights
    with E the config's expert count."""
    subs = [cfg, *(getattr(cfg, k) for k in ("ffn_config", "text_config") if hasattr(cfg, k))]
    counts = {getattr(c, k, None) for c in subs for k in N_EXPERT_KEYS} - {None}
    return any(
        "experts" in name.split(".") or (p.dim() == 3 and p.shape[0] in counts) for name, p in model.named_parameters()
    )


def discover() -> tuple[list[str], dict[str, str]]:
    """(MoE types, {type: why it could not be built}) among transformers' causal LMs whose
    config names experts."""
    found, failed = [], {}
    for mt in sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES):
        try:
            if not expert_keys(AutoConfig.for_model(mt).to_dict()):
                continue
            cfg = small_config(mt)
            model = meta_model(cfg)
        except Exception as e:  # a type whose small config transformers cannot build
            failed[mt] = f"{type(e).__name__}: {str(e).splitlines()[0][:100]}"
            continue
        if has_routed_experts(cfg, model):
            found.append(mt)
    return found, failed


MOE_TYPES, BUILD_FAILURES = discover()


def test_the_moe_types_of_the_pinned_transformers():
    assert transformers.__version__.startswith("5.24"), "the dev extra pins transformers==5.24.*"
    assert set(BUILD_FAILURES) <= set(UNSUPPORTED)
    assert set(MOE_TYPES) == EXPECTED_TYPES


def test_unsupported_types_fail_in_one_line(tmp_path, capsys):
    cfg = small_config("doge")
    cfg.save_pretrained(tmp_path)
    assert main(["params", str(tmp_path)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1
    assert "model_type 'doge' names 16 routed experts but moekit found no expert weights" in err


def meta_count(model) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("mt", MOE_TYPES)
def test_moekit_params_equals_the_meta_count(mt, tmp_path, capsys):
    cfg = small_config(mt)
    cfg.save_pretrained(tmp_path)  # config.json, as transformers writes it
    want = meta_count(meta_model(AutoConfig.from_pretrained(tmp_path)))
    assert main(["params", str(tmp_path), "--json"]) == 0
    out, err = capsys.readouterr()
    got = json.loads(out)
    assert got["total"] == want - KNOWN_DIFFERENCE.get(mt, _none)(cfg)
    assert 0 < got["active"] < got["total"]
    assert (
        sum(
            got["breakdown"][c]
            for c in got["breakdown"]
            if c not in ("routed_experts_active", *got.get("outside_total", []))
        )
        == got["total"]
    )


NATIVE = sorted(mt for mt in MOE_TYPES if mt in TYPES)


@pytest.mark.parametrize("mt", NATIVE)
def test_native_readers_agree_with_the_module_tree(mt, tmp_path, capsys):
    """Two independent counts: the native reader (config arithmetic) and the generic path
    (transformers' module tree): equal totals and equal active parameters."""
    cfg = small_config(mt)
    cfg.save_pretrained(tmp_path)
    assert main(["params", str(tmp_path), "--json"]) == 0
    native = json.loads(capsys.readouterr()[0])
    assert "notes" not in native or not any("transformers" in n for n in native["notes"])  # the native path ran
    generic = count_with_transformers(json.loads((tmp_path / "config.json").read_text())).params
    assert native["total"] == generic.total - KNOWN_DIFFERENCE.get(mt, _none)(cfg)
    if mt != "longcat_flash":  # see test_longcat_zero_computation_experts
        assert native["active"] == generic.active


def test_longcat_zero_computation_experts(tmp_path, capsys):
    """Top-k over E real + Z zero experts: uniform routing uses k·E/(E+Z) real experts a layer,
    between max(0, k − Z) and min(k, E); everything else is always active."""
    cfg = AutoConfig.for_model(
        "longcat_flash", **SMALL, num_layers=2, n_routed_experts=6, zero_expert_num=2, moe_topk=3,
        expert_ffn_hidden_size=16, ffn_hidden_size=32, q_lora_rank=24, kv_lora_rank=16,
        qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
    )  # fmt: skip
    cfg.save_pretrained(tmp_path)
    assert main(["params", str(tmp_path), "--json"]) == 0
    got = json.loads(capsys.readouterr()[0])
    expert = 3 * 64 * 16
    rest = got["active"] - got["breakdown"]["routed_experts_active"]
    assert got["breakdown"]["routed_experts"] == 2 * 6 * expert
    assert got["breakdown"]["routed_experts_active"] == 2 * 3 * 6 * expert // 8
    assert got["active_min"] == rest + 2 * 1 * expert and got["active_max"] == rest + 2 * 3 * expert
    assert main(["params", str(tmp_path)]) == 0
    assert "zero-computation experts" in capsys.readouterr()[0]


def test_without_transformers_the_error_says_how_to_install(monkeypatch, tmp_path, capsys):
    small_config("afmoe").save_pretrained(tmp_path)
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    assert main(["params", str(tmp_path)]) == 2
    err = capsys.readouterr()[1]
    assert "pip install 'moekit[hf]'" in err and len(err.strip().splitlines()) == 1
