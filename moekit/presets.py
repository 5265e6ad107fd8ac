"""Named model configurations: published MoE models, dense baselines and tiny CPU models.

Values of released models are taken from their published ``config.json`` (the test
``tests/test_presets.py`` re-derives each one from a copy of that file through
``moekit.interop.hf_config`` and checks they agree). The DeepSeekMoE 2B and 145B models were
never released; they are reconstructed from the DeepSeekMoE paper (Dai et al. 2024, §4.1 and
Appendix A), see the comments on each.

``get_preset(name)`` returns a fresh copy, so callers may change it (``cfg.replace(vocab_size=...)``
or ``set_by_path``) without touching the table.
"""

from __future__ import annotations

from moekit.config import AttentionConfig, ConfigError, ModelConfig, MoEConfig

_YARN_DEEPSEEK = {
    "beta_fast": 32,
    "beta_slow": 1,
    "factor": 40,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
    "original_max_position_embeddings": 4096,
    "type": "yarn",
}


def _mixtral(name: str, d: int, layers: int, heads: int, ffn: int, max_seq: int) -> ModelConfig:
    return ModelConfig(
        name=name,
        vocab_size=32000,
        d_model=d,
        n_layers=layers,
        attention=AttentionConfig(n_heads=heads, n_kv_heads=8, head_dim=128, rope_theta=1e6),
        dense_ffn_dim=ffn,  # unused: every layer is MoE
        moe=MoEConfig(n_routed_experts=8, top_k=2, expert_ffn_dim=ffn),
        norm_eps=1e-5,
        max_seq_len=max_seq,
    )


def _deepseek_moe(
    name: str, vocab: int, d: int, layers: int, heads: int, dense_ffn: int, moe: MoEConfig, max_seq: int
) -> ModelConfig:
    return ModelConfig(
        name=name,
        vocab_size=vocab,
        d_model=d,
        n_layers=layers,
        attention=AttentionConfig(n_heads=heads, n_kv_heads=heads, head_dim=d // heads),
        dense_ffn_dim=dense_ffn,
        moe=moe,
        max_seq_len=max_seq,
    )


def _deepseek_mla(
    name: str,
    *,
    vocab: int,
    d: int,
    layers: int,
    heads: int,
    q_lora: int | None,
    dense_ffn: int,
    moe: MoEConfig,
    yarn: dict,
) -> ModelConfig:
    return ModelConfig(
        name=name,
        vocab_size=vocab,
        d_model=d,
        n_layers=layers,
        attention=AttentionConfig(
            n_heads=heads, kind="mla", q_lora_rank=q_lora, rope_scaling=dict(yarn), rope_interleave=True
        ),
        dense_ffn_dim=dense_ffn,
        moe=moe,
        max_seq_len=163840,
    )


def _gpt_oss(name: str, layers: int, experts: int) -> ModelConfig:
    return ModelConfig(
        name=name,
        vocab_size=201088,
        d_model=2880,
        n_layers=layers,
        attention=AttentionConfig(
            n_heads=64,
            n_kv_heads=8,
            head_dim=64,
            qkv_bias=True,
            o_bias=True,
            sinks=True,
            rope_theta=150000.0,
            rope_scaling={
                "beta_fast": 32.0,
                "beta_slow": 1.0,
                "factor": 32.0,
                "original_max_position_embeddings": 4096,
                "rope_type": "yarn",
                "truncate": False,
            },
            sliding_window=128,  # on even layers; odd layers attend to the full context
            sliding_layers=list(range(0, layers, 2)),
        ),
        dense_ffn_dim=2880,  # unused: every layer is MoE
        moe=MoEConfig(
            n_routed_experts=experts,
            top_k=4,
            expert_ffn_dim=2880,
            router_bias=True,
            expert_bias=True,
            expert_activation="clamped_swiglu",
        ),
        norm_eps=1e-5,
        max_seq_len=131072,
    )


NOPE = list(range(3, 48, 4))  # Llama 4's no_rope_layer_interval 4


def _llama4(
    name: str, experts: int, moe_every: int, qk_norm: str, rope_scaling: dict | None, max_seq: int
) -> ModelConfig:
    # Text model only: the published totals (109B Scout, 400B Maverick) include the vision tower.
    return ModelConfig(
        name=name,
        vocab_size=202048,
        d_model=5120,
        n_layers=48,
        attention=AttentionConfig(
            n_heads=40,
            n_kv_heads=8,
            head_dim=128,
            qk_norm=qk_norm,  # type: ignore[arg-type]
            rope_theta=500000.0,
            rope_scaling=rope_scaling,
            rope_interleave=True,
            nope_layers=NOPE,  # every 4th layer has no rotary embedding ...
            chunk_size=8192,  # ... the others attend within chunks of 8192 tokens
            chunked_layers=[i for i in range(48) if i not in NOPE],
            temperature_tuning=True,
        ),
        dense_ffn_dim=16384,  # intermediate_size_mlp, the non-MoE layers of Maverick
        moe=MoEConfig(
            n_routed_experts=experts,
            top_k=1,
            expert_ffn_dim=8192,
            n_shared_experts=1,
            shared_ffn_dim=8192,
            score_func="sigmoid",
            norm_topk_prob=False,
            scale_expert_input=True,
            # interleave_moe_layer_step: layers step-1, 2·step-1, ... are MoE
            first_k_dense=moe_every - 1,
            moe_every=moe_every,
        ),
        norm_eps=1e-5,
        max_seq_len=max_seq,
    )


def _dense(
    name: str, vocab: int, d: int, layers: int, heads: int, ffn: int, eps: float, max_seq: int = 4096
) -> ModelConfig:
    return ModelConfig(
        name=name,
        vocab_size=vocab,
        d_model=d,
        n_layers=layers,
        attention=AttentionConfig(n_heads=heads, n_kv_heads=heads, head_dim=d // heads),
        dense_ffn_dim=ffn,
        norm_eps=eps,
        max_seq_len=max_seq,
    )


PRESETS: dict[str, ModelConfig] = {
    # Mistral AI: mistralai/Mixtral-8x7B-v0.1, Mixtral-8x22B-v0.1 config.json.
    "mixtral-8x7b": _mixtral("mixtral-8x7b", 4096, 32, 32, 14336, 32768),
    "mixtral-8x22b": _mixtral("mixtral-8x22b", 6144, 56, 48, 16384, 65536),
    # DeepSeekMoE 2B (never released), paper §4.1: 9 layers, width 1280, 10 heads of 128; every
    # FFN is MoE with 16 standard-FFN-sized parameters split m=4 ways into 64 experts, 1 shared
    # + 63 routed, top-7 (1 + 7 = 2 standard FFNs active); an 8K tokenizer. A standard FFN holds
    # 8·d² parameters, so one expert is 2·d² = 3·d·F with F = 2d/3 = 853.3 -> 853.
    # Gives 1.97B total / 0.32B active / 4.3T FLOPs per 2K tokens (paper: 2.0B / 0.3B / 4.3T).
    "deepseek-moe-2b": _deepseek_moe(
        "deepseek-moe-2b",
        8192,
        1280,
        9,
        10,
        3413,  # unused: no dense layer
        MoEConfig(n_routed_experts=63, top_k=7, expert_ffn_dim=853, n_shared_experts=1, norm_topk_prob=False),
        2048,
    ),
    # deepseek-ai/deepseek-moe-16b-base config.json (model_type "deepseek").
    "deepseek-moe-16b": _deepseek_moe(
        "deepseek-moe-16b",
        102400,
        2048,
        28,
        16,
        10944,
        MoEConfig(
            n_routed_experts=64, top_k=6, expert_ffn_dim=1408, n_shared_experts=2, norm_topk_prob=False, first_k_dense=1
        ),
        4096,
    ),
    # DeepSeekMoE 145B (preliminary, never released), paper §7 / Appendix A: 62 layers, width
    # 4096, 32 heads of 128, 4 shared + 128 routed experts of 0.125 standard-FFN size, top-12,
    # first layer dense. Expert width 1408 (as in the 16B: 0.125·2.75·4096) and dense width
    # 16·1408 = 22528 (as wide as the activated experts) reproduce the paper's 144.6B total,
    # 22.2B active and 585.6T FLOPs per 4K tokens (ours: 144.6B / 22.2B / 586.3T).
    "deepseek-moe-145b": _deepseek_moe(
        "deepseek-moe-145b",
        102400,
        4096,
        62,
        32,
        22528,
        MoEConfig(
            n_routed_experts=128,
            top_k=12,
            expert_ffn_dim=1408,
            n_shared_experts=4,
            norm_topk_prob=False,
            first_k_dense=1,
        ),
        4096,
    ),
    # deepseek-ai/DeepSeek-V2-Lite and DeepSeek-V2 config.json.
    "deepseek-v2-lite": _deepseek_mla(
        "deepseek-v2-lite",
        vocab=102400,
        d=2048,
        layers=27,
        heads=16,
        q_lora=None,
        dense_ffn=10944,
        moe=MoEConfig(
            n_routed_experts=64, top_k=6, expert_ffn_dim=1408, n_shared_experts=2, norm_topk_prob=False, first_k_dense=1
        ),
        yarn={**_YARN_DEEPSEEK, "mscale": 0.707, "mscale_all_dim": 0.707},
    ),
    "deepseek-v2": _deepseek_mla(
        "deepseek-v2",
        vocab=102400,
        d=5120,
        layers=60,
        heads=128,
        q_lora=1536,
        dense_ffn=12288,
        moe=MoEConfig(
            n_routed_experts=160,
            top_k=6,
            expert_ffn_dim=1536,
            n_shared_experts=2,
            norm_topk_prob=False,
            routed_scaling_factor=16.0,
            n_group=8,
            topk_group=3,
            group_score="max",  # group_limited_greedy: groups ranked by their best expert
            first_k_dense=1,
        ),
        yarn=_YARN_DEEPSEEK,
    ),
    # deepseek-ai/DeepSeek-V3 config.json; the multi-token-prediction module (14B, in the
    # checkpoint as layer 61) is not part of the 671B model and is not built.
    "deepseek-v3": _deepseek_mla(
        "deepseek-v3",
        vocab=129280,
        d=7168,
        layers=61,
        heads=128,
        q_lora=1536,
        dense_ffn=18432,
        moe=MoEConfig(
            n_routed_experts=256,
            top_k=8,
            expert_ffn_dim=2048,
            n_shared_experts=1,
            score_func="sigmoid",
            norm_topk_prob=True,
            routed_scaling_factor=2.5,
            n_group=8,
            topk_group=4,
            selection_bias=True,  # e_score_correction_bias (auxiliary-loss-free balancing)
            first_k_dense=3,
        ),
        yarn=_YARN_DEEPSEEK,
    ),
    # Qwen/Qwen1.5-MoE-A2.7B config.json: 60 routed + one 4x-wide shared expert with a sigmoid gate.
    "qwen1.5-moe-a2.7b": ModelConfig(
        name="qwen1.5-moe-a2.7b",
        vocab_size=151936,
        d_model=2048,
        n_layers=24,
        attention=AttentionConfig(n_heads=16, n_kv_heads=16, head_dim=128, qkv_bias=True, rope_theta=1e6),
        dense_ffn_dim=5632,  # unused: every layer is MoE
        moe=MoEConfig(
            n_routed_experts=60,
            top_k=4,
            expert_ffn_dim=1408,
            n_shared_experts=1,
            shared_ffn_dim=5632,
            shared_expert_gate=True,
            norm_topk_prob=False,
        ),
        max_seq_len=8192,
    ),
    # Qwen/Qwen3-30B-A3B config.json.
    "qwen3-30b-a3b": ModelConfig(
        name="qwen3-30b-a3b",
        vocab_size=151936,
        d_model=2048,
        n_layers=48,
        attention=AttentionConfig(n_heads=32, n_kv_heads=4, head_dim=128, qk_norm="head", rope_theta=1e6),
        dense_ffn_dim=6144,  # unused: every layer is MoE
        moe=MoEConfig(n_routed_experts=128, top_k=8, expert_ffn_dim=768, norm_topk_prob=True),
        max_seq_len=40960,
    ),
    # allenai/OLMoE-1B-7B-0924 config.json.
    "olmoe-1b-7b": ModelConfig(
        name="olmoe-1b-7b",
        vocab_size=50304,
        d_model=2048,
        n_layers=16,
        attention=AttentionConfig(n_heads=16, n_kv_heads=16, head_dim=128, qk_norm="full"),
        dense_ffn_dim=1024,  # unused: every layer is MoE
        moe=MoEConfig(n_routed_experts=64, top_k=8, expert_ffn_dim=1024, norm_topk_prob=False),
        norm_eps=1e-5,
    ),
    # openai/gpt-oss-20b and gpt-oss-120b config.json (weights stored in MXFP4; counts are logical).
    "gpt-oss-20b": _gpt_oss("gpt-oss-20b", 24, 32),
    "gpt-oss-120b": _gpt_oss("gpt-oss-120b", 36, 128),
    # microsoft/Phi-3.5-MoE-instruct config.json (its longrope scaling factors are not kept).
    "phi-3.5-moe": ModelConfig(
        name="phi-3.5-moe",
        vocab_size=32064,
        d_model=4096,
        n_layers=32,
        attention=AttentionConfig(n_heads=32, n_kv_heads=8, head_dim=128, qkv_bias=True, o_bias=True),
        dense_ffn_dim=6400,  # unused: every layer is MoE
        moe=MoEConfig(n_routed_experts=16, top_k=2, expert_ffn_dim=6400, router="sparsemixer", sparsemixer_eps=0.01),
        norm="layernorm",
        norm_eps=1e-5,
        lm_head_bias=True,
        max_seq_len=131072,
    ),
    # meta-llama/Llama-4-Scout-17B-16E and Llama-4-Maverick-17B-128E, text_config.
    "llama-4-scout": _llama4(
        "llama-4-scout",
        16,
        1,
        "l2",
        {
            "factor": 8.0,
            "high_freq_factor": 4.0,
            "low_freq_factor": 1.0,
            "original_max_position_embeddings": 8192,
            "rope_type": "llama3",
        },
        10485760,
    ),
    "llama-4-maverick": _llama4("llama-4-maverick", 128, 2, "none", None, 1048576),
    # Dense baselines the DeepSeekMoE paper compares against (meta-llama/Llama-2-7b-hf,
    # deepseek-ai/deepseek-llm-7b-base config.json).
    "llama2-7b": _dense("llama2-7b", 32000, 4096, 32, 32, 11008, 1e-5),
    "deepseek-llm-7b": _dense("deepseek-llm-7b", 102400, 4096, 30, 32, 11008, 1e-6),
    # Tiny models for tests and CPU demos (a few million parameters). vocab_size is meant to be
    # overridden by the tokenizer actually used: get_preset("tiny").replace(vocab_size=...).
    # "tiny" is DeepSeek-V3's MoE in miniature: layer 0 dense, then fine-grained experts (a
    # 512-wide FFN split into 4, 16 routed, top-4) plus one always-on shared expert; sigmoid scores
    # renormalised over the chosen, auxiliary-loss-free balancing (gamma 0.003, measured in the
    # README's balancing study) and grouped-query attention. A design Hugging Face's glm4_moe
    # expresses exactly, so a trained tiny model exports to a folder transformers loads natively.
    "tiny": ModelConfig(
        name="tiny",
        vocab_size=4096,
        d_model=256,
        n_layers=4,
        attention=AttentionConfig(n_heads=4, n_kv_heads=2),
        dense_ffn_dim=768,
        moe=MoEConfig(
            n_routed_experts=16,
            top_k=4,
            expert_ffn_dim=128,
            n_shared_experts=1,
            score_func="sigmoid",
            norm_topk_prob=True,
            first_k_dense=1,
            aux_free_rate=0.003,
            seq_aux_loss_coef=0.0001,  # DeepSeek-V3's sequence-wise alpha
        ),
        max_seq_len=512,
    ),
    # Mixtral in miniature: every layer MoE, 8 experts top-2, grouped-query attention.
    "tiny-mixtral": ModelConfig(
        name="tiny-mixtral",
        vocab_size=4096,
        d_model=256,
        n_layers=4,
        attention=AttentionConfig(n_heads=8, n_kv_heads=2),
        dense_ffn_dim=512,  # unused: every layer is MoE
        moe=MoEConfig(n_routed_experts=8, top_k=2, expert_ffn_dim=512, aux_loss_coef=0.02),
        norm_eps=1e-5,
        max_seq_len=512,
    ),
    # The dense baseline of the tiny models (same width and depth, one 768-wide FFN per layer).
    "tiny-dense": _dense("tiny-dense", 4096, 256, 4, 4, 768, 1e-6, max_seq=512),
}


def preset_names() -> list[str]:
    """Every preset name, in table order."""
    return list(PRESETS)


def get_preset(name: str) -> ModelConfig:
    """A fresh copy of the preset ``name``; unknown names raise ``ConfigError`` listing them all."""
    try:
        cfg = PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}") from None
    return ModelConfig.from_dict(cfg.to_dict())


__all__ = ["PRESETS", "get_preset", "preset_names"]
