"""Published sizes of released checkpoints, from the configs of phimoe, dbrx, ernie4_5_moe, minimax_m2,
hunyuan_v1_moe and granitemoe: each type's reader must give the model cards' totals and active
parameters (as the cards round them)."""

from __future__ import annotations

import pytest

from moekit.accounting import count_params
from moekit.interop.hf_config import config_from_hf

PUBLISHED = {
    # microsoft/Phi-3.5-MoE-instruct: "41.9B total parameters, 6.6B active"
    "Phi-3.5-MoE": (
        dict(
            model_type="phimoe", hidden_size=4096, intermediate_size=6400, num_hidden_layers=32,
            num_attention_heads=32, num_key_value_heads=8, vocab_size=32064, num_local_experts=16,
            num_experts_per_tok=2, attention_bias=True, lm_head_bias=True, max_position_embeddings=131072,
        ),
        (41.9, 6.6), 1,
    ),
    # databricks/dbrx-base: "132B total parameters of which 36B parameters are active"
    "DBRX": (
        dict(
            model_type="dbrx", d_model=6144, n_heads=48, n_layers=40, max_seq_len=32768, vocab_size=100352,
            attn_config=dict(clip_qkv=8, kv_n_heads=8, rope_theta=500000),
            ffn_config=dict(ffn_hidden_size=10752, moe_num_experts=16, moe_top_k=4),
        ),
        (132, 36), 0,
    ),
    # baidu/ERNIE-4.5-21B-A3B-PT: "21B total parameters" (21.8B on the hub), "3B activated" per token
    "ERNIE-4.5-21B-A3B": (
        dict(
            model_type="ernie4_5_moe", hidden_size=2560, intermediate_size=12288, num_hidden_layers=28,
            num_attention_heads=20, num_key_value_heads=4, head_dim=None, vocab_size=103424, rope_theta=500000,
            use_bias=False, tie_word_embeddings=True, moe_num_experts=64, moe_layer_start_index=1,
            moe_layer_end_index=None, moe_intermediate_size=1536, moe_k=6, moe_layer_interval=1,
            moe_num_shared_experts=2,
        ),
        (22, 3), 0,
    ),
    # tencent/Hunyuan-A13B-Instruct: "80B total parameters, 13B active"
    "Hunyuan-A13B": (
        dict(
            model_type="hunyuan_v1_moe", hidden_size=4096, intermediate_size=3072, num_hidden_layers=32,
            num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=128167, num_experts=64,
            moe_topk=[8] * 32, tie_word_embeddings=True,
        ),
        (80, 13), 0,
    ),
    # ibm-granite/granite-3.0-3b-a800m: "3.3B total parameters, 800M active" (0.9B with the embedding)
    "granite-3.0-3b-a800m": (
        dict(
            model_type="granitemoe", hidden_size=1536, intermediate_size=512, num_hidden_layers=32,
            num_attention_heads=24, num_key_value_heads=8, vocab_size=49155, num_local_experts=40,
            num_experts_per_tok=8, tie_word_embeddings=True,
        ),
        (3.3, 0.9), 1,
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_total_and_active(name):
    d, (total, active), digits = PUBLISHED[name]
    p = count_params(config_from_hf(d))
    assert (round(p.total / 1e9, digits), round(p.active / 1e9, digits)) == (total, active)


def test_minimax_m2_230b_total_10b_active_without_embeddings():
    """MiniMaxAI/MiniMax-M2: "230B total parameters with 10B active" (the active figure without
    the 0.6B embedding and 0.6B head)."""
    d = dict(
        model_type="minimax_m2", hidden_size=3072, intermediate_size=1536, num_hidden_layers=62,
        num_attention_heads=48, num_key_value_heads=8, head_dim=128, rotary_dim=64, vocab_size=200064,
        num_local_experts=256, num_experts_per_tok=8,
    )  # fmt: skip
    p = count_params(config_from_hf(d))
    embeddings = p.breakdown["embedding"] + p.breakdown["lm_head"]
    assert round(p.total / 1e10) == 23 and round((p.active - embeddings) / 1e9) == 10


def test_hunyuan_ntk_alpha_is_a_static_rope_base():
    """Hunyuan-A13B's "dynamic" rope with alpha 1000: base 1e4 * 1000 ** (128 / 126) (vLLM's 11158839.9)."""
    d = dict(PUBLISHED["Hunyuan-A13B"][0], rope_theta=10000.0, rope_scaling={"type": "dynamic", "alpha": 1000.0})
    att = config_from_hf(d).attention
    assert att.rope_theta == pytest.approx(11158839.925, rel=1e-9) and att.rope_scaling is None
