"""The model-type registry: every type listed once, with what moekit can do with it."""

from __future__ import annotations

import pytest

from moekit.config import AttentionConfig, ModelConfig, MoEConfig
from moekit.interop.hf_export import ARCHITECTURES, BUILDERS, infer_model_type
from moekit.interop.hf_weights import LAYOUTS
from moekit.interop.types import TYPES, ModelType, get_type, loadable_types, type_of, writable_types

# Every registered type. Adding a type means adding it here too (and its file).
REGISTERED = {
    "arctic",
    "bailing_moe",
    "dbrx",
    "deepseek",
    "deepseek_v2",
    "deepseek_v3",
    "deepseek_v32",
    "dots1",
    "ernie4_5_moe",
    "glm4_moe",
    "glm4_moe_lite",
    "glm_moe_dsa",
    "gpt_oss",
    "granitemoe",
    "granitemoeshared",
    "grok-1",
    "hunyuan",
    "hunyuan_v1_moe",
    "hy_v3",
    "jamba",
    "jetmoe",
    "kimi_k2",
    "llama",
    "llama4",
    "llama4_text",
    "longcat_flash",
    "minimax",
    "minimax_m2",
    "mistral",
    "mixtral",
    "nemotron_h",
    "olmoe",
    "phimoe",
    "qwen2",
    "qwen2_moe",
    "qwen3",
    "qwen3_moe",
    "qwen3_next",
    "skywork",
    "skywork_moe",
    "xverse",
}
WRITABLE = {
    "mixtral",
    "qwen2_moe",
    "qwen3_moe",
    "olmoe",
    "deepseek_v2",
    "deepseek_v3",
    "dots1",
    "glm4_moe",
    "gpt_oss",
    "llama4_text",
    "phimoe",
    "granitemoe",
    "granitemoeshared",
    "dbrx",
    "ernie4_5_moe",
    "hunyuan_v1_moe",
    "minimax_m2",
}
LOADABLE = WRITABLE | {"kimi_k2"}  # Kimi-K2 checkpoints have DeepSeek-V3's tensor names


def test_every_registered_type_is_listed():
    assert set(TYPES) == REGISTERED
    assert all(isinstance(t, ModelType) and t.name == name for name, t in TYPES.items())


def test_loadable_and_writable_types():
    assert set(loadable_types()) == LOADABLE == set(LAYOUTS)
    assert set(writable_types()) == WRITABLE == set(BUILDERS) == set(ARCHITECTURES)
    assert ARCHITECTURES["deepseek_v3"] == "DeepseekV3ForCausalLM"


def test_lookup_by_model_type_and_architectures():
    assert get_type("mixtral") is TYPES["mixtral"]
    assert get_type("bert") is None
    assert type_of({"model_type": "olmoe"}) is TYPES["olmoe"]
    assert type_of({"model_type": "bert"}) is None
    assert type_of({"architectures": ["NoSuchForCausalLM"]}) is None
    assert type_of({"architectures": ["Grok1ModelForCausalLM"]}) is TYPES["grok-1"]  # Grok-1 has no model_type


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
            AttentionConfig(**GQA),
            MoEConfig(n_routed_experts=4, top_k=2, expert_ffn_dim=8, n_shared_experts=1, shared_expert_gate=True),
            "qwen2_moe",
        ),
        (
            AttentionConfig(
                n_heads=2,
                kind="mla",
                kv_lora_rank=8,
                qk_nope_head_dim=4,
                qk_rope_head_dim=4,
                v_head_dim=4,
                rope_interleave=True,
            ),
            MoEConfig(n_routed_experts=4, top_k=2, expert_ffn_dim=8, n_shared_experts=1, norm_topk_prob=False),
            "deepseek_v2",
        ),
        (
            AttentionConfig(
                n_heads=2, kind="mla", kv_lora_rank=8, qk_nope_head_dim=4, qk_rope_head_dim=4, v_head_dim=4
            ),
            MoEConfig(n_routed_experts=4, top_k=2, expert_ffn_dim=8, n_shared_experts=1, score_func="sigmoid"),
            "deepseek_v3",
        ),
        (
            AttentionConfig(**GQA, partial_rotary_factor=0.5),
            MoEConfig(n_routed_experts=4, top_k=2, expert_ffn_dim=8, n_shared_experts=1, score_func="sigmoid"),
            "glm4_moe",
        ),
    ],
)
def test_infer_model_type_from_each_types_claims(attention, moe, expected):
    cfg = ModelConfig(vocab_size=32, d_model=16, n_layers=2, dense_ffn_dim=32, attention=attention, moe=moe)
    assert infer_model_type(cfg) == expected


MOE = dict(n_routed_experts=4, top_k=2, expert_ffn_dim=8)


@pytest.mark.parametrize(
    "model, expected",
    [
        (
            dict(
                norm="layernorm",
                lm_head_bias=True,
                attention=AttentionConfig(**GQA, qkv_bias=True, o_bias=True),
                moe=MoEConfig(**MOE, router="sparsemixer"),
            ),
            "phimoe",
        ),
        (dict(embedding_multiplier=12.0, attention=AttentionConfig(**GQA, softmax_scale=0.125)), "granitemoe"),
        (dict(residual_multiplier=0.2, moe=MoEConfig(**MOE, n_shared_experts=1)), "granitemoeshared"),
        (dict(norm="layernorm_nobias", norm_eps=1e-5, attention=AttentionConfig(**GQA, clip_qkv=8.0)), "dbrx"),
        (
            dict(
                attention=AttentionConfig(**GQA, rope_interleave=True),
                moe=MoEConfig(**MOE, n_shared_experts=2, selection_bias=True),
            ),
            "ernie4_5_moe",
        ),
        (
            dict(
                attention=AttentionConfig(**GQA, qk_norm="head", qk_norm_after_rope=True),
                moe=MoEConfig(**MOE, n_shared_experts=1),
            ),
            "hunyuan_v1_moe",
        ),
        (
            dict(
                attention=AttentionConfig(**GQA, qk_norm="full", partial_rotary_factor=0.5),
                moe=MoEConfig(**MOE, score_func="sigmoid", selection_bias=True),
            ),
            "minimax_m2",
        ),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_infer_model_type_of_configs_only_one_type_expresses(model, expected):
    """Each config is written as the one type whose writer accepts every field (and whose claims fit)."""
    kw = dict(vocab_size=32, d_model=16, n_layers=2, dense_ffn_dim=32, attention=AttentionConfig(**GQA))
    cfg = ModelConfig(**{**kw, "moe": MoEConfig(**MOE), **model})
    assert infer_model_type(cfg) == expected


def test_kimi_k2_checkpoints_load_as_deepseek_v3(tmp_path):
    """Kimi-K2 keeps DeepSeek-V3's tensor names under its own model_type."""
    import json

    import torch

    from moekit.interop.pretrained import from_pretrained
    from moekit.models.transformer import MoETransformer

    cfg = ModelConfig(
        vocab_size=40, d_model=16, n_layers=2, dense_ffn_dim=24,
        attention=AttentionConfig(n_heads=2, kind="mla", q_lora_rank=8, kv_lora_rank=8, qk_nope_head_dim=4,
                                  qk_rope_head_dim=4, v_head_dim=4, rope_interleave=True),
        moe=MoEConfig(n_routed_experts=4, top_k=2, expert_ffn_dim=8, n_shared_experts=1, score_func="sigmoid",
                      n_group=2, topk_group=1, selection_bias=True, first_k_dense=1),
    )  # fmt: skip
    model = MoETransformer(cfg).eval()
    model.save_pretrained(tmp_path, model_type="deepseek_v3")
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(dict(config, model_type="kimi_k2")))
    loaded = from_pretrained(tmp_path)
    ids = torch.arange(10).view(1, 10)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=1e-6, atol=1e-6)


def test_ignored_tensors_rotary_caches_mtp_layers_and_patterns():
    t = ModelType(
        "demo", read=TYPES["mixtral"].read, ignored=(r"model\.layers\.\d+\.mlp\.gate\.e_score_correction_bias",)
    )
    ignore = t.ignore({"num_nextn_predict_layers": 1}, n_layers=2)
    assert ignore("model.layers.0.self_attn.rotary_emb.inv_freq")
    assert ignore("model.layers.2.mlp.experts.0.w1.weight")  # the MTP layer after the last one
    assert not ignore("model.layers.1.mlp.experts.0.w1.weight") and not ignore("model.layers.3.mlp.gate.weight")
    assert ignore("model.layers.1.mlp.gate.e_score_correction_bias")
