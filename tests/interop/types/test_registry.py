"""The model-type registry: every type listed once, with what moekit can do with it."""

from __future__ import annotations

import pytest

from moekit.config import AttentionConfig, ModelConfig, MoEConfig
from moekit.interop.hf_export import ARCHITECTURES, BUILDERS, infer_model_type
from moekit.interop.hf_weights import LAYOUTS
from moekit.interop.types import TYPES, ModelType, get_type, loadable_types, type_of, writable_types

# Every registered type. Adding a type means adding it here too (and its file).
REGISTERED = {
    "dbrx",
    "deepseek",
    "deepseek_v2",
    "deepseek_v3",
    "ernie4_5_moe",
    "gpt_oss",
    "granitemoe",
    "granitemoeshared",
    "hunyuan_v1_moe",
    "llama",
    "llama4",
    "llama4_text",
    "minimax_m2",
    "mistral",
    "mixtral",
    "olmoe",
    "phimoe",
    "qwen2",
    "qwen2_moe",
    "qwen3",
    "qwen3_moe",
}
LOADABLE = {
    "mixtral",
    "qwen2_moe",
    "qwen3_moe",
    "olmoe",
    "deepseek_v3",
    "phimoe",
    "granitemoe",
    "granitemoeshared",
    "dbrx",
    "ernie4_5_moe",
    "hunyuan_v1_moe",
    "minimax_m2",
}


def test_every_registered_type_is_listed():
    assert set(TYPES) == REGISTERED
    assert all(isinstance(t, ModelType) and t.name == name for name, t in TYPES.items())


def test_loadable_and_writable_types():
    assert set(loadable_types()) == LOADABLE == set(LAYOUTS)
    assert set(writable_types()) == LOADABLE == set(BUILDERS) == set(ARCHITECTURES)
    assert ARCHITECTURES["deepseek_v3"] == "DeepseekV3ForCausalLM"


def test_lookup_by_model_type_and_architectures():
    assert get_type("mixtral") is TYPES["mixtral"]
    assert get_type("bert") is None
    assert type_of({"model_type": "olmoe"}) is TYPES["olmoe"]
    assert type_of({"model_type": "bert"}) is None
    assert type_of({"architectures": ["NoSuchForCausalLM"]}) is None


def test_a_record_needs_a_reader_and_a_writer_needs_an_architecture():
    with pytest.raises(ValueError, match="reader"):
        ModelType("nothing")
    with pytest.raises(ValueError, match="architecture"):
        ModelType("half", read=TYPES["mixtral"].read, write=TYPES["mixtral"].write)


GQA = dict(n_heads=4, n_kv_heads=2)


@pytest.mark.parametrize(
    "attention, moe, expected",
    [
        (AttentionConfig(**GQA), MoEConfig(n_routed_experts=4, top_k=2, expert_ffn_dim=8), "mixtral"),
        (AttentionConfig(**GQA, qk_norm="head"), MoEConfig(n_routed_experts=4, top_k=2, expert_ffn_dim=8), "qwen3_moe"),
        (AttentionConfig(**GQA, qk_norm="full"), MoEConfig(n_routed_experts=4, top_k=2, expert_ffn_dim=8), "olmoe"),
        (
            AttentionConfig(**GQA, qk_norm="head"),
            MoEConfig(n_routed_experts=4, top_k=2, expert_ffn_dim=8, n_shared_experts=1, shared_expert_gate=True),
            "qwen2_moe",
        ),
        (
            AttentionConfig(**GQA, qkv_bias=True, o_bias=True),
            MoEConfig(n_routed_experts=4, top_k=2, expert_ffn_dim=8, router="sparsemixer"),
            "phimoe",
        ),
        (
            AttentionConfig(
                n_heads=2, kind="mla", kv_lora_rank=8, qk_nope_head_dim=4, qk_rope_head_dim=4, v_head_dim=4
            ),
            MoEConfig(n_routed_experts=4, top_k=2, expert_ffn_dim=8),
            "deepseek_v3",
        ),
    ],
)
def test_infer_model_type_from_each_types_claims(attention, moe, expected):
    cfg = ModelConfig(vocab_size=32, d_model=16, n_layers=2, dense_ffn_dim=32, attention=attention, moe=moe)
    assert infer_model_type(cfg) == expected
