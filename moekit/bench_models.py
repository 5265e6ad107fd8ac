"""The models ``moekit bench --train`` and ``--decode`` time, built from plain configs.

The two model rows are the ones issue 17 measured (batch 8 x 128): a Qwen3-MoE-like and a
DeepSeek-V3-like model at d 256, 4 layers, vocab 4096; the layer row is one Qwen3-MoE layer at
d 512 with 64 experts x 192, top-8. ``quick=True`` gives the same architectures at toy size, for
tests in seconds. Each model's balance losses are its published model's (Qwen3: the router aux
loss at 0.001; DeepSeek-V3: the aux-loss-free bias at rate 0.001 and the sequence-wise loss at
1e-4), so the benchmark times the step a user trains with.

The decode rows (``DECODE_MODELS``, issue 13) are larger: d 512, 8 layers, vocab 8192, about 32M
active parameters each.
"""

from __future__ import annotations

from collections.abc import Callable

from moekit.config import AttentionConfig, ModelConfig, MoEConfig

LAYER_ROW = "moe-layer"
# DeepSeek-V3's routing: sigmoid scores renormalised over the top-k, 8 groups of which the top 4 are
# searched, scaling 2.5, the selection bias of auxiliary-loss-free balancing; one shared expert.
V3_ROUTING = dict(
    n_shared_experts=1,
    score_func="sigmoid",
    norm_topk_prob=True,
    routed_scaling_factor=2.5,
    n_group=8,
    topk_group=4,
    selection_bias=True,
)


def qwen3_moe_like(quick: bool = False) -> ModelConfig:
    """Qwen3-MoE in miniature: every layer MoE, 16 experts x 128, top-4 renormalised, GQA 8/4 of 32,
    q/k norm, Qwen3's router aux loss (coefficient 0.001)."""
    return ModelConfig(
        name="qwen3-moe-like",
        vocab_size=512 if quick else 4096,
        d_model=64 if quick else 256,
        n_layers=2 if quick else 4,
        attention=AttentionConfig(n_heads=8, n_kv_heads=4, head_dim=8 if quick else 32, qk_norm="head", rope_theta=1e6),
        dense_ffn_dim=128 if quick else 1024,  # unused: every layer is MoE
        moe=MoEConfig(
            n_routed_experts=8 if quick else 16,
            top_k=2 if quick else 4,
            expert_ffn_dim=32 if quick else 128,
            norm_topk_prob=True,
            aux_loss_coef=0.001,
        ),
        max_seq_len=512,
    )


def deepseek_v3_like(quick: bool = False) -> ModelConfig:
    """DeepSeek-V3 in miniature: MLA without q compression, layer 0 dense, then 64 experts x 64 top-8
    + 1 shared with V3's routing (sigmoid, 8 groups, top-4 groups, scaling 2.5, selection bias) and
    balancing (aux-loss-free bias rate 0.001, sequence-wise aux loss 1e-4)."""
    return ModelConfig(
        name="deepseek-v3-like",
        vocab_size=512 if quick else 4096,
        d_model=64 if quick else 256,
        n_layers=2 if quick else 4,
        attention=AttentionConfig(
            n_heads=8,
            kind="mla",
            q_lora_rank=None,
            kv_lora_rank=16 if quick else 64,
            qk_nope_head_dim=8 if quick else 32,
            qk_rope_head_dim=8 if quick else 16,
            v_head_dim=8 if quick else 32,
            rope_interleave=True,
        ),
        dense_ffn_dim=128 if quick else 1024,
        moe=MoEConfig(
            n_routed_experts=16 if quick else 64,
            top_k=4 if quick else 8,
            expert_ffn_dim=16 if quick else 64,
            **V3_ROUTING,
            aux_free_rate=0.001,
            seq_aux_loss_coef=1e-4,
            first_k_dense=1,
        ),
        max_seq_len=512,
    )


def layer_model(quick: bool = False) -> ModelConfig:
    """A one-layer Qwen3-MoE model whose MoE layer is the layer row's (d 512, 64 experts x 192, top-8)."""
    return ModelConfig(
        name=LAYER_ROW,
        vocab_size=256,
        d_model=64 if quick else 512,
        n_layers=1,
        attention=AttentionConfig(n_heads=4, n_kv_heads=2, head_dim=16, qk_norm="head"),
        dense_ffn_dim=128,
        moe=MoEConfig(
            n_routed_experts=16 if quick else 64,
            top_k=4 if quick else 8,
            expert_ffn_dim=32 if quick else 192,
            norm_topk_prob=True,
        ),
        max_seq_len=512,
    )


TRAIN_MODELS: dict[str, Callable[[bool], ModelConfig]] = {
    "qwen3-moe-like": qwen3_moe_like,
    "deepseek-v3-like": deepseek_v3_like,
}


def qwen3_moe_decode(quick: bool = False) -> ModelConfig:
    """Qwen3-MoE in miniature for decoding: every layer MoE, 64 experts x 192, top-8 (softmax, not
    renormalised), GQA 8/2 of 64, q/k norm."""
    return ModelConfig(
        name="qwen3-moe-like",
        vocab_size=512 if quick else 8192,
        d_model=64 if quick else 512,
        n_layers=2 if quick else 8,
        attention=AttentionConfig(n_heads=8, n_kv_heads=2, head_dim=8 if quick else 64, qk_norm="head", rope_theta=1e6),
        dense_ffn_dim=128 if quick else 1536,  # unused: every layer is MoE
        moe=MoEConfig(
            n_routed_experts=16 if quick else 64, top_k=4 if quick else 8, expert_ffn_dim=16 if quick else 192
        ),
        max_seq_len=512,
    )


def deepseek_v3_decode(quick: bool = False) -> ModelConfig:
    """DeepSeek-V3 in miniature for decoding: MLA, layer 0 dense, then 64 experts x 160 top-8 + 1 shared
    with V3's routing: 9 x 160 active FFN width against the Qwen-like model's 8 x 192, and MLA's
    attention weights near its GQA's."""
    return ModelConfig(
        name="deepseek-v3-like",
        vocab_size=512 if quick else 8192,
        d_model=64 if quick else 512,
        n_layers=2 if quick else 8,
        attention=AttentionConfig(
            n_heads=8,
            kind="mla",
            q_lora_rank=32 if quick else 192,
            kv_lora_rank=16 if quick else 128,
            qk_nope_head_dim=8 if quick else 64,
            qk_rope_head_dim=8 if quick else 32,
            v_head_dim=8 if quick else 64,
            rope_interleave=True,
        ),
        dense_ffn_dim=144 if quick else 1440,
        moe=MoEConfig(
            n_routed_experts=16 if quick else 64,
            top_k=4 if quick else 8,
            expert_ffn_dim=16 if quick else 160,
            **V3_ROUTING,
            first_k_dense=1,
        ),
        max_seq_len=512,
    )


DECODE_MODELS: dict[str, Callable[[], ModelConfig]] = {
    "qwen3-moe-like": qwen3_moe_decode,
    "deepseek-v3-like": deepseek_v3_decode,
}
QUICK_DECODE_MODELS: dict[str, Callable[[], ModelConfig]] = {
    "qwen3-moe-like": lambda: qwen3_moe_decode(True),
    "deepseek-v3-like": lambda: deepseek_v3_decode(True),
}
