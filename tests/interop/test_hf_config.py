"""Hugging Face config.json parsing: small hand-written configs of every supported model type,
checked field by field and (where transformers has the type) against transformers' own model;
SPEC resolution; the errors for configs moekit cannot represent."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from moekit.accounting import count_params
from moekit.config import ConfigError
from moekit.interop.hf_config import SUPPORTED_MODEL_TYPES, config_from_hf, load_spec
from moekit.presets import get_preset

HF_CONFIGS = Path(__file__).parents[1] / "data" / "hf_configs"

BASE = dict(
    vocab_size=101,
    hidden_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=48,
)

SMALL = {
    "mixtral": dict(BASE, model_type="mixtral", num_local_experts=4, num_experts_per_tok=2, rope_theta=1e6),
    "qwen2_moe": dict(
        BASE,
        model_type="qwen2_moe",
        num_key_value_heads=4,
        num_experts=6,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=32,
        decoder_sparse_step=2,
        mlp_only_layers=[],
        norm_topk_prob=False,
    ),
    "qwen3_moe": dict(
        BASE,
        model_type="qwen3_moe",
        head_dim=24,
        num_experts=6,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        mlp_only_layers=[2],
        norm_topk_prob=True,
    ),
    "olmoe": dict(BASE, model_type="olmoe", num_experts=8, num_experts_per_tok=2),
    "deepseek_v2": dict(
        BASE,
        model_type="deepseek_v2",
        num_key_value_heads=4,
        q_lora_rank=None,
        kv_lora_rank=16,
        qk_nope_head_dim=8,
        qk_rope_head_dim=4,
        v_head_dim=8,
        n_routed_experts=8,
        n_shared_experts=2,
        num_experts_per_tok=2,
        moe_intermediate_size=12,
        first_k_dense_replace=1,
        topk_method="group_limited_greedy",
        n_group=4,
        topk_group=2,
        routed_scaling_factor=16.0,
        attention_bias=True,
    ),
    "deepseek_v3": dict(
        BASE,
        model_type="deepseek_v3",
        num_key_value_heads=4,
        q_lora_rank=24,
        kv_lora_rank=16,
        qk_nope_head_dim=8,
        qk_rope_head_dim=4,
        v_head_dim=8,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=2,
        moe_intermediate_size=12,
        first_k_dense_replace=2,
        n_group=2,
        topk_group=1,
        routed_scaling_factor=2.5,
        num_nextn_predict_layers=1,
    ),
    "dots1": dict(
        BASE,
        model_type="dots1",
        head_dim=24,
        n_routed_experts=8,
        n_shared_experts=2,
        num_experts_per_tok=2,
        moe_intermediate_size=12,
        first_k_dense_replace=1,
        n_group=2,
        topk_group=1,
        attention_bias=True,
        sliding_window=16,
        max_window_layers=2,
    ),
    "glm4_moe": dict(
        BASE,
        model_type="glm4_moe",
        head_dim=24,
        n_routed_experts=8,
        n_shared_experts=2,
        num_experts_per_tok=2,
        moe_intermediate_size=12,
        first_k_dense_replace=1,
        n_group=2,
        topk_group=1,
        use_qk_norm=True,
        attention_bias=True,
        partial_rotary_factor=0.5,
        num_nextn_predict_layers=1,
    ),
    "gpt_oss": dict(
        BASE, model_type="gpt_oss", head_dim=16, num_local_experts=4, num_experts_per_tok=2, layer_types=None
    ),
    "phimoe": dict(
        BASE, model_type="phimoe", num_local_experts=4, num_experts_per_tok=2, attention_bias=True, lm_head_bias=True
    ),
    "dbrx": dict(
        model_type="dbrx",
        vocab_size=101,
        d_model=64,
        n_heads=4,
        n_layers=3,
        attn_config=dict(kv_n_heads=2, clip_qkv=8.0, rope_theta=5e5),
        ffn_config=dict(ffn_hidden_size=40, moe_num_experts=4, moe_top_k=2),
    ),
    "ernie4_5_moe": dict(
        BASE,
        model_type="ernie4_5_moe",
        moe_num_experts=6,
        moe_k=2,
        moe_intermediate_size=16,
        moe_num_shared_experts=2,
        moe_layer_start_index=1,
        moe_layer_interval=2,
        use_bias=True,
    ),
    "granitemoe": dict(BASE, model_type="granitemoe", num_local_experts=4, num_experts_per_tok=2, attention_bias=True),
    "granitemoeshared": dict(
        BASE, model_type="granitemoeshared", num_local_experts=4, num_experts_per_tok=2, shared_intermediate_size=40
    ),
    "hunyuan_v1_moe": dict(
        BASE, model_type="hunyuan_v1_moe", head_dim=24, num_experts=6, moe_topk=2, attention_bias=True
    ),
    "minimax_m2": dict(
        BASE, model_type="minimax_m2", head_dim=24, rotary_dim=12, num_local_experts=6, num_experts_per_tok=2
    ),
    "llama4_text": dict(
        BASE,
        model_type="llama4_text",
        head_dim=16,
        intermediate_size_mlp=96,
        num_local_experts=4,
        num_experts_per_tok=1,
        interleave_moe_layer_step=2,
        moe_layers=None,
        use_qk_norm=True,
    ),
    "llama": dict(BASE, model_type="llama", attention_bias=True),
    "qwen2": dict(BASE, model_type="qwen2"),
    "qwen3": dict(BASE, model_type="qwen3", head_dim=32),
}


def transformers_count(d: dict) -> int:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.AutoConfig.for_model(**d)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(cfg)
    # Frozen parameters are statistics, not weights: ERNIE-4.5 keeps its selection bias
    # (e_score_correction_bias, requires_grad=False) as a Parameter where DeepSeek-V3 has a buffer.
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("model_type", sorted(SMALL))
def test_small_config_total_equals_transformers(model_type):
    d = SMALL[model_type]
    assert count_params(config_from_hf(d)).total == transformers_count(d)


# Native readers exercised elsewhere: against transformers in tests/interop/test_every_moe_type.py
# (small random configs), against published configs in tests/interop/types/test_published.py.
NATIVE_ELSEWHERE = {
    "dots1",
    "glm4_moe",
    "glm4_moe_lite",
    "granitemoe",
    "hunyuan_v1_moe",
    "hy_v3",
    "kimi_k2",
    "minimax_m2",
}


def test_every_supported_type_is_exercised():
    assert set(SUPPORTED_MODEL_TYPES) == set(SMALL) | {"deepseek", "llama4", "mistral"} | NATIVE_ELSEWHERE


def test_mixtral_fields():
    cfg = config_from_hf(SMALL["mixtral"])
    assert cfg.moe.n_routed_experts == 4 and cfg.moe.top_k == 2 and cfg.moe.expert_ffn_dim == 48
    assert cfg.moe_layer_ids == [0, 1, 2, 3]
    assert cfg.attention.n_kv_heads == 2 and cfg.attention.rope_theta == 1e6


def test_qwen2_moe_placement_shared_gate_and_bias():
    # (i + 1) % decoder_sparse_step == 0 -> layers 1 and 3
    cfg = config_from_hf(SMALL["qwen2_moe"])
    assert cfg.moe_layer_ids == [1, 3]
    assert cfg.moe.n_shared_experts == 1 and cfg.moe.shared_ffn_dim == 32 and cfg.moe.shared_expert_gate
    assert cfg.attention.qkv_bias and not cfg.attention.o_bias
    assert not cfg.moe.norm_topk_prob
    # mlp_only_layers that break the pattern -> an explicit list
    cfg = config_from_hf(dict(SMALL["qwen2_moe"], decoder_sparse_step=1, mlp_only_layers=[2]))
    assert cfg.moe.moe_layers == [0, 1, 3] and cfg.moe_layer_ids == [0, 1, 3]
    d = dict(SMALL["qwen2_moe"], decoder_sparse_step=1, mlp_only_layers=[2])
    assert count_params(cfg).total == transformers_count(d)


def test_qwen2_moe_without_experts_is_dense():
    cfg = config_from_hf(dict(SMALL["qwen2_moe"], num_experts=0))
    assert cfg.moe is None


def test_qwen3_moe_fields():
    cfg = config_from_hf(SMALL["qwen3_moe"])
    assert cfg.attention.qk_norm == "head" and cfg.attention.head_dim == 24
    assert cfg.moe_layer_ids == [0, 1, 3] and cfg.moe.norm_topk_prob


def test_olmoe_full_qk_norm():
    cfg = config_from_hf(SMALL["olmoe"])
    assert cfg.attention.qk_norm == "full"
    assert count_params(cfg).breakdown["norms"] == 4 * (2 * 64 + 64 + 32) + 64  # q_norm H·hd, k_norm G·hd


def test_deepseek_v2_fields():
    cfg = config_from_hf(SMALL["deepseek_v2"])
    a, m = cfg.attention, cfg.moe
    assert a.kind == "mla" and a.q_lora_rank is None and a.kv_lora_rank == 16 and a.mla_bias and a.rope_interleave
    assert m.n_group == 4 and m.topk_group == 2 and m.group_score == "max" and m.routed_scaling_factor == 16.0
    assert not m.selection_bias and m.score_func == "softmax"
    assert m.n_shared_experts == 2 and m.shared_ffn_dim == 12
    assert cfg.moe_layer_ids == [1, 2, 3] and cfg.dense_ffn_dim == 48


def test_deepseek_v3_fields():
    cfg = config_from_hf(SMALL["deepseek_v3"])
    m = cfg.moe
    assert m.score_func == "sigmoid"  # transformers' DeepseekV3 scores with a sigmoid, no key needed
    assert m.selection_bias  # topk_method defaults to noaux_tc for deepseek_v3
    assert m.n_group == 2 and m.topk_group == 1 and m.group_score == "top2_sum" and m.routed_scaling_factor == 2.5
    assert cfg.moe_layer_ids == [2, 3]
    v3 = config_from_hf(json.loads((HF_CONFIGS / "deepseek-v3.json").read_text()))
    assert v3.moe.score_func == "sigmoid" and v3.moe.norm_topk_prob and v3.moe.selection_bias


def test_deepseek_moe_layer_freq_rule():
    """DeepSeek's rule is ``i >= first_k_dense_replace and i % moe_layer_freq == 0``; with
    first_k_dense_replace=1 and moe_layer_freq=2 that is layers 2 and 4 — not moekit's
    (i - first_k_dense) % moe_every, which would give 1, 3, 5."""
    d = dict(SMALL["deepseek_v3"], num_hidden_layers=6, first_k_dense_replace=1, moe_layer_freq=2)
    assert config_from_hf(d).moe_layer_ids == [2, 4]
    d = dict(SMALL["deepseek_v3"], num_hidden_layers=7, first_k_dense_replace=3, moe_layer_freq=3)
    cfg = config_from_hf(d)
    assert cfg.moe_layer_ids == [3, 6]


def test_deepseek_moe_v1():
    d = json.loads((HF_CONFIGS / "deepseek-moe-16b.json").read_text())
    cfg = config_from_hf(d)
    assert cfg.attention.kind == "gqa" and cfg.attention.n_kv_heads == 16
    assert cfg.moe_layer_ids == list(range(1, 28)) and cfg.dense_ffn_dim == 10944
    assert cfg.moe.n_shared_experts == 2 and cfg.moe.shared_ffn_dim == 1408 and not cfg.moe.norm_topk_prob
    small = dict(
        BASE,
        model_type="deepseek",
        n_routed_experts=4,
        n_shared_experts=None,
        num_experts_per_tok=2,
        moe_intermediate_size=8,
    )
    cfg = config_from_hf(small)
    assert cfg.moe.n_shared_experts == 0 and cfg.moe_layer_ids == [0, 1, 2, 3]
    assert config_from_hf(dict(small, n_routed_experts=None)).moe is None


def test_gpt_oss_fields():
    cfg = config_from_hf(SMALL["gpt_oss"])
    a, m = cfg.attention, cfg.moe
    assert a.sinks and a.qkv_bias and a.o_bias and a.head_dim == 16
    assert m.router_bias and m.expert_bias and not cfg.tie_embeddings
    assert config_from_hf(dict(SMALL["gpt_oss"], num_experts_per_tok=None, experts_per_token=3)).moe.top_k == 3


def test_phimoe_fields():
    cfg = config_from_hf(SMALL["phimoe"])
    assert cfg.norm == "layernorm" and cfg.lm_head_bias
    assert cfg.attention.qkv_bias and cfg.attention.o_bias


def test_llama4_text_and_multimodal():
    cfg = config_from_hf(SMALL["llama4_text"])
    assert cfg.moe_layer_ids == [1, 3] and cfg.dense_ffn_dim == 96
    assert cfg.attention.qk_norm == "l2"
    assert cfg.moe.n_shared_experts == 1 and cfg.moe.shared_ffn_dim == 48 and cfg.moe.score_func == "sigmoid"
    full = {"model_type": "llama4", "text_config": dict(SMALL["llama4_text"]), "vision_config": {"hidden_size": 8}}
    assert config_from_hf(full).to_dict() == cfg.to_dict()
    with pytest.raises(ConfigError, match="text_config"):
        config_from_hf({"model_type": "llama4"})
    explicit = config_from_hf(dict(SMALL["llama4_text"], moe_layers=[0, 2, 3]))
    assert explicit.moe_layer_ids == [0, 2, 3]
    assert config_from_hf(dict(SMALL["llama4_text"], use_qk_norm=False)).attention.qk_norm == "none"


def test_dense_types():
    llama = config_from_hf(SMALL["llama"])
    assert llama.moe is None and llama.attention.qkv_bias and llama.attention.o_bias
    qwen2 = config_from_hf(SMALL["qwen2"])
    assert qwen2.attention.qkv_bias and not qwen2.attention.o_bias
    assert config_from_hf(SMALL["qwen3"]).attention.qk_norm == "head"


def test_rope_from_transformers5_rope_parameters():
    d = dict(SMALL["mixtral"])
    d.pop("rope_theta")
    d["rope_parameters"] = {
        "rope_theta": 5e5,
        "rope_type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    a = config_from_hf(d).attention
    assert a.rope_theta == 5e5 and a.rope_scaling == {
        "rope_type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    d["rope_parameters"] = {"rope_theta": 5e5, "rope_type": "default"}
    assert config_from_hf(d).attention.rope_scaling is None


# Errors -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "d, match",
    [
        ({"model_type": "bert"}, "unsupported model_type 'bert'; supported: .*deepseek, deepseek_v2"),
        ({"hidden_size": 8}, "no 'model_type'"),
        (dict(SMALL["mixtral"], num_local_experts=None), "'num_local_experts'"),
        ({k: v for k, v in SMALL["olmoe"].items() if k != "hidden_size"}, "missing the key 'hidden_size'"),
        (dict(SMALL["mixtral"], hidden_size="64"), "'hidden_size' must be an integer"),
        (dict(SMALL["deepseek_v3"], mlp_bias=True), "'mlp_bias'"),
        (dict(SMALL["llama"], mlp_bias=True), "'mlp_bias'"),
        (dict(SMALL["qwen2_moe"], shared_expert_intermediate_size=0), "'shared_expert_intermediate_size'"),
        (dict(SMALL["deepseek_v3"], topk_method="sinkhorn"), "'topk_method'"),
        (dict(SMALL["deepseek_v3"], scoring_func="relu"), "'scoring_func'"),
        (dict(SMALL["olmoe"], head_dim=8), "'head_dim'"),
        (dict(SMALL["qwen3_moe"], mlp_only_layers="2"), "'mlp_only_layers'"),
        (dict(SMALL["hunyuan_v1_moe"], moe_topk=[2, 2, 1, 2]), r"'moe_topk' = \[2, 2, 1, 2\] is not supported"),
    ],
)
def test_unrepresentable_or_malformed_configs_raise(d, match):
    with pytest.raises(ConfigError, match=match):
        config_from_hf(d)


# load_spec ----------------------------------------------------------------------------------------


def test_load_spec_preset():
    assert load_spec("tiny") == get_preset("tiny")


def test_load_spec_moekit_json(tmp_path):
    path = tmp_path / "mine.json"
    get_preset("tiny-mixtral").to_json(path)
    assert load_spec(str(path)) == get_preset("tiny-mixtral")
    unnamed = get_preset("tiny").to_dict()
    unnamed["name"] = ""
    path.write_text(json.dumps(unnamed))
    assert load_spec(str(path)).name == "mine"


def test_load_spec_hf_file_and_folder(tmp_path):
    src = HF_CONFIGS / "mixtral-8x7b.json"
    cfg = load_spec(str(src))
    assert count_params(cfg).total == 46_702_792_704
    folder = tmp_path / "Mixtral-8x7B-v0.1"
    folder.mkdir()
    (folder / "config.json").write_text(src.read_text())
    assert load_spec(str(folder)).to_dict() | {"name": ""} == cfg.to_dict() | {"name": ""}


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda tmp: str(tmp / "nope.json"), r"config file .*nope\.json does not exist"),
        (lambda tmp: str(tmp), r"folder .* has no config\.json"),
        (lambda tmp: _write(tmp / "bad.json", "{not json"), r"config file .*bad\.json is not valid JSON"),
        (lambda tmp: _write(tmp / "list.json", "[1, 2]"), r"list\.json must hold a JSON object"),
        (lambda tmp: _write(tmp / "what.json", '{"layers": 3}'), r"neither a moekit config .* nor a Hugging Face"),
        (lambda tmp: _write(tmp / "bert.json", '{"model_type": "bert"}'), r"bert\.json.*unsupported model_type 'bert'"),
        (lambda tmp: _write(tmp / "m.json", '{"d_model": 8}'), r"m\.json: config is missing the required key"),
        (lambda tmp: "mixtral-8x8b", r"unknown preset 'mixtral-8x8b'; known presets: mixtral-8x7b"),
    ],
)
def test_load_spec_errors_name_the_file_or_preset(tmp_path, make, match):
    with pytest.raises(ConfigError, match=match):
        load_spec(make(tmp_path))


def _write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


# kimi_k2 is not in transformers.
@pytest.mark.parametrize("model_type", sorted(set(SUPPORTED_MODEL_TYPES) - {"deepseek", "llama4", "kimi_k2"}))
def test_configs_written_by_transformers5(model_type):
    """transformers 5 writes ``rope_parameters`` instead of rope_theta / rope_scaling and renames
    some keys (qwen3_moe's num_local_experts); its own defaults, saved and parsed, still count
    exactly what its model holds."""
    transformers = pytest.importorskip("transformers")
    kw = dict(num_hidden_layers=3, vocab_size=100)
    if model_type == "deepseek_v2":  # its defaults leave num_experts_per_tok unset
        kw.update(num_experts_per_tok=2, first_k_dense_replace=1)
    if model_type == "dots1":  # its defaults leave the experts unset
        kw.update(n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1)
    if model_type == "dbrx":  # its attention reads attn_config.rope_theta, which has no default
        kw.update(attn_config={"rope_theta": 5e5})
    if model_type == "hunyuan_v1_moe":  # its attention reads config.head_dim, which defaults to None
        kw.update(head_dim=128)
    written = json.loads(transformers.AutoConfig.for_model(model_type, **kw).to_json_string())
    assert count_params(config_from_hf(written)).total == transformers_count(written)
