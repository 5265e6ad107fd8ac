"""The DeepSeek-MoE family beyond V3 against transformers: glm4_moe, deepseek_v2, dots1.

Each case switches every option of its type on, with odd sizes (see ``hf_oracle`` for the checks):
GLM-4.5's partial rotary, per-head q/k norm, q/k/v biases, sigmoid group-limited routing with a
selection bias and shared experts; DeepSeek-V2's MLA with and without q compression, greedy and
group-limited greedy routing, YaRN; dots.llm1's Qwen3 attention with sliding-window layers.
"""

from __future__ import annotations

import pytest

transformers = pytest.importorskip("transformers")

import hf_oracle as oracle  # noqa: E402

from moekit.interop.pretrained import from_pretrained  # noqa: E402

COMMON = dict(hidden_size=36, num_attention_heads=6, max_position_embeddings=64)
YARN = {
    "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "beta_fast": 32, "beta_slow": 1,
    "mscale": 0.707, "mscale_all_dim": 0.707, "rope_theta": 5000.0,
}  # fmt: skip
CASES = {
    # partial rotary 0.4 of head_dim 10 (a rotary width of 4), q/k norm, q/k/v biases,
    # 8 experts in 4 groups, two of them kept, top-3, 2 shared experts, one dense layer first.
    "glm4_moe": dict(
        model_type="glm4_moe", num_hidden_layers=3, num_key_value_heads=2, head_dim=10, intermediate_size=26,
        moe_intermediate_size=10, n_routed_experts=8, num_experts_per_tok=3, n_group=4, topk_group=2,
        n_shared_experts=2, routed_scaling_factor=1.7, first_k_dense_replace=1, use_qk_norm=True,
        attention_bias=True, rope_parameters={"rope_type": "default", "rope_theta": 5000.0,
                                              "partial_rotary_factor": 0.4},
        rms_norm_eps=1e-5,
    ),
    # GLM-4.5-Air-like: no q/k norm, one group, partial rotary 0.5 (by default) of head_dim 6: int(3) sets
    # the frequencies and 4 dims rotate, as in transformers. Also: no renormalisation, tied embeddings.
    "glm4_moe_plain": dict(
        model_type="glm4_moe", num_hidden_layers=2, num_key_value_heads=3, intermediate_size=22,
        moe_intermediate_size=14, n_routed_experts=5, num_experts_per_tok=2, n_shared_experts=1,
        first_k_dense_replace=0, norm_topk_prob=False, tie_word_embeddings=True,
    ),
    # No q compression, attention biases, group-limited greedy (groups ranked by their best expert),
    # YaRN with mscale_all_dim (sharper softmax) past its original 16 positions, routed scaling.
    "deepseek_v2": dict(
        model_type="deepseek_v2", num_hidden_layers=3, num_key_value_heads=6, intermediate_size=26,
        moe_intermediate_size=10, n_routed_experts=9, num_experts_per_tok=3, n_group=3, topk_group=2,
        topk_method="group_limited_greedy", n_shared_experts=2, routed_scaling_factor=16.0, first_k_dense_replace=1,
        q_lora_rank=None, kv_lora_rank=14, qk_nope_head_dim=6, qk_rope_head_dim=4, v_head_dim=10,
        attention_bias=True, rope_scaling=YARN, rms_norm_eps=1e-5,
    ),
    # V2 proper: q compression, plain greedy top-k, one shared expert, tied embeddings.
    "deepseek_v2_greedy": dict(
        model_type="deepseek_v2", num_hidden_layers=2, num_key_value_heads=6, intermediate_size=22,
        moe_intermediate_size=12, n_routed_experts=5, num_experts_per_tok=2, topk_method="greedy",
        n_shared_experts=1, routed_scaling_factor=1.3, first_k_dense_replace=0, q_lora_rank=18, kv_lora_rank=10,
        qk_nope_head_dim=8, qk_rope_head_dim=6, v_head_dim=7, tie_word_embeddings=True,
    ),
    # dots.llm1: Qwen3 attention (q/k norm, q/k/v/o biases), sliding windows of 5 slots from layer 1
    # on, V3 routing with groups, renormalisation and scaling.
    "dots1": dict(
        model_type="dots1", num_hidden_layers=3, num_key_value_heads=2, head_dim=8, intermediate_size=26,
        moe_intermediate_size=10, n_routed_experts=8, num_experts_per_tok=3, n_group=2, topk_group=1,
        n_shared_experts=2, routed_scaling_factor=2.0, norm_topk_prob=True, first_k_dense_replace=1,
        attention_bias=True, sliding_window=5, max_window_layers=1,
    ),
    # Its defaults: no renormalisation, every layer MoE, full attention, tied embeddings.
    "dots1_plain": dict(
        model_type="dots1", num_hidden_layers=2, num_key_value_heads=3, intermediate_size=22,
        moe_intermediate_size=12, n_routed_experts=5, num_experts_per_tok=2, n_shared_experts=1,
        tie_word_embeddings=True,
    ),
}  # fmt: skip


pair = oracle.pair_fixture(CASES, COMMON)


class TestAgainstTransformers(oracle.ParityChecks):
    """Logits, cached decoding, greedy and left-padded generation, written folders, quantised refusals, config."""


def test_fused_expert_layout_loads(tmp_path):
    """A raw transformers-5 state_dict (fused ``gate_up_proj`` / ``down_proj``) loads too."""
    from safetensors.torch import save_file

    kw = dict(CASES["glm4_moe"])
    hf = oracle.build_hf(transformers, kw.pop("model_type"), **COMMON, **kw)
    hf.config.save_pretrained(tmp_path)
    sd = {k: v.contiguous() for k, v in hf.state_dict().items()}
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in sd)
    save_file(sd, tmp_path / "model.safetensors")
    oracle.check_logits(hf, from_pretrained(tmp_path))


def test_glm4_moe_default_partial_rotary_is_half():
    """GLM configs without partial_rotary_factor rotate half of each head, as transformers does."""
    from moekit.interop.hf_config import config_from_hf

    kw = dict(CASES["glm4_moe_plain"])
    d = {"vocab_size": 97, **COMMON, **kw}
    assert config_from_hf(d).attention.partial_rotary_factor == 0.5
    assert transformers.AutoConfig.for_model(**d).rope_parameters["partial_rotary_factor"] == 0.5
