"""ModelConfig -> a Hugging Face ``config.json`` dict, one builder per model type.

The reverse of ``moekit.interop.hf_config.config_from_hf``. Each builder first checks that the
config is expressible in that model type and raises ``UnsupportedError`` naming the first field
that is not (say, ``moe.capacity_factor``: transformers' MoE blocks never drop tokens). Training-
only settings (balancing coefficients, noise) have no effect on the forward pass and are not written.

Rope settings are written in the legacy ``rope_theta``/``rope_scaling`` form, which every
transformers release since 4.56 reads (5.x converts it to ``rope_parameters``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from moekit.config import ModelConfig, MoEConfig
from moekit.interop.hf_weights import UnsupportedError

ARCHITECTURES = {
    "mixtral": "MixtralForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "olmoe": "OlmoeForCausalLM",
    "deepseek_v3": "DeepseekV3ForCausalLM",
}


def infer_model_type(cfg: ModelConfig) -> str:
    """The HF model type whose architecture matches ``cfg``'s distinguishing features.

    Only a guess from the config (MLA -> deepseek_v3, gated shared expert -> qwen2_moe, per-head
    q/k norm -> qwen3_moe, full q/k norm -> olmoe, else mixtral); ``to_hf_config`` then checks
    every field against the guessed type.
    """
    if cfg.moe is None:
        raise UnsupportedError("moe is None: a dense model has no Hugging Face MoE model type")
    if cfg.attention.kind == "mla":
        return "deepseek_v3"
    if cfg.moe.shared_expert_gate:
        return "qwen2_moe"
    return {"head": "qwen3_moe", "full": "olmoe"}.get(cfg.attention.qk_norm, "mixtral")


def _require(ok: bool, field: str, value: Any, model_type: str, expected: str) -> None:
    if not ok:
        raise UnsupportedError(f"{field}={value!r} cannot be written as model_type {model_type!r}: expected {expected}")


def _common(cfg: ModelConfig, model_type: str) -> tuple[MoEConfig, dict[str, Any]]:
    """Checks every supported type shares, and the keys every type writes."""
    moe = cfg.moe
    if moe is None:
        raise UnsupportedError(f"moe is None: model_type {model_type!r} needs an MoE config")
    att = cfg.attention
    for field, value, ok, expected in [
        ("norm", cfg.norm, cfg.norm == "rmsnorm", "'rmsnorm'"),
        ("lm_head_bias", cfg.lm_head_bias, not cfg.lm_head_bias, "False"),
        ("attention.sinks", att.sinks, not att.sinks, "False"),
        ("moe.router", moe.router, moe.router == "topk", "'topk'"),
        ("moe.capacity_factor", moe.capacity_factor, moe.capacity_factor is None, "None (dropless)"),
        ("moe.router_bias", moe.router_bias, not moe.router_bias, "False"),
        ("moe.expert_bias", moe.expert_bias, not moe.expert_bias, "False"),
    ]:
        _require(ok, field, value, model_type, expected)
    if att.kind != "mla":
        _require(not att.rope_interleave, "attention.rope_interleave", True, model_type, "False")
    out: dict[str, Any] = {
        "architectures": [ARCHITECTURES[model_type]],
        "model_type": model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": att.n_heads,
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "hidden_act": "silu",
        "tie_word_embeddings": cfg.tie_embeddings,
        "num_experts_per_tok": moe.top_k,
        "rope_theta": att.rope_theta,
    }
    if att.rope_scaling is not None:
        out["rope_scaling"] = dict(att.rope_scaling)
    if att.kind == "gqa":
        out["num_key_value_heads"] = att.n_kv_heads
        out["head_dim"] = att.head_dim
    return moe, out


def _softmax_router(cfg: ModelConfig, moe: MoEConfig, model_type: str) -> None:
    """Mixtral/Qwen/OLMoE routers: softmax over all experts, top-k, optional renormalisation."""
    for field, value, ok, expected in [
        ("moe.score_func", moe.score_func, moe.score_func == "softmax", "'softmax'"),
        ("moe.routed_scaling_factor", moe.routed_scaling_factor, moe.routed_scaling_factor == 1.0, "1.0"),
        ("moe.n_group", moe.n_group, moe.n_group == 1, "1"),
        ("moe.selection_bias", moe.uses_selection_bias, not moe.uses_selection_bias, "False"),
    ]:
        _require(ok, field, value, model_type, expected)


def _gqa(cfg: ModelConfig, model_type: str, qk_norm: str, biases: str) -> bool:
    """Check the attention; ``biases``: "qkv" (Qwen2-MoE), "all" (one attention_bias flag)."""
    att = cfg.attention
    _require(att.kind == "gqa", "attention.kind", att.kind, model_type, "'gqa'")
    _require(att.qk_norm == qk_norm, "attention.qk_norm", att.qk_norm, model_type, repr(qk_norm))
    if biases == "all":
        _require(att.qkv_bias == att.o_bias, "attention.o_bias", att.o_bias, model_type, f"{att.qkv_bias} (= qkv_bias)")
    else:
        _require(not att.o_bias, "attention.o_bias", att.o_bias, model_type, "False")
    return att.qkv_bias


def _all_moe(cfg: ModelConfig, model_type: str) -> None:
    _require(cfg.n_dense_layers == 0, "moe layers", cfg.moe_layer_ids, model_type, "every layer an MoE layer")


def _qwen_placement(cfg: ModelConfig) -> dict[str, Any]:
    """Qwen: layer i is MoE iff i not in mlp_only_layers and (i + 1) % decoder_sparse_step == 0."""
    moe_ids = set(cfg.moe_layer_ids)
    return {"decoder_sparse_step": 1, "mlp_only_layers": [i for i in range(cfg.n_layers) if i not in moe_ids]}


def _mixtral(cfg: ModelConfig) -> dict[str, Any]:
    moe, out = _common(cfg, "mixtral")
    _gqa(cfg, "mixtral", "none", "all")
    _require(not cfg.attention.qkv_bias, "attention.qkv_bias", True, "mixtral", "False")
    _softmax_router(cfg, moe, "mixtral")
    _require(moe.norm_topk_prob, "moe.norm_topk_prob", False, "mixtral", "True")
    _require(moe.n_shared_experts == 0, "moe.n_shared_experts", moe.n_shared_experts, "mixtral", "0")
    _all_moe(cfg, "mixtral")
    out.update(intermediate_size=moe.expert_ffn_dim, num_local_experts=moe.n_routed_experts, sliding_window=None)
    return out


def _qwen2_moe(cfg: ModelConfig) -> dict[str, Any]:
    moe, out = _common(cfg, "qwen2_moe")
    qkv_bias = _gqa(cfg, "qwen2_moe", "none", "qkv")
    _softmax_router(cfg, moe, "qwen2_moe")
    _require(moe.n_shared_experts > 0, "moe.n_shared_experts", moe.n_shared_experts, "qwen2_moe", ">= 1")
    _require(moe.shared_expert_gate, "moe.shared_expert_gate", False, "qwen2_moe", "True")
    assert moe.shared_ffn_dim is not None
    out.update(
        intermediate_size=cfg.dense_ffn_dim,
        moe_intermediate_size=moe.expert_ffn_dim,
        shared_expert_intermediate_size=moe.n_shared_experts * moe.shared_ffn_dim,
        num_experts=moe.n_routed_experts,
        norm_topk_prob=moe.norm_topk_prob,
        qkv_bias=qkv_bias,
        use_sliding_window=False,
        **_qwen_placement(cfg),
    )
    return out


def _qwen3_moe(cfg: ModelConfig) -> dict[str, Any]:
    moe, out = _common(cfg, "qwen3_moe")
    bias = _gqa(cfg, "qwen3_moe", "head", "all")
    _softmax_router(cfg, moe, "qwen3_moe")
    _require(moe.n_shared_experts == 0, "moe.n_shared_experts", moe.n_shared_experts, "qwen3_moe", "0")
    out.update(
        intermediate_size=cfg.dense_ffn_dim,
        moe_intermediate_size=moe.expert_ffn_dim,
        num_experts=moe.n_routed_experts,
        norm_topk_prob=moe.norm_topk_prob,
        attention_bias=bias,
        use_sliding_window=False,
        **_qwen_placement(cfg),
    )
    return out


def _olmoe(cfg: ModelConfig) -> dict[str, Any]:
    moe, out = _common(cfg, "olmoe")
    bias = _gqa(cfg, "olmoe", "full", "all")
    att = cfg.attention
    # OLMoE sizes its q/k norms from hidden_size // num_attention_heads, so head_dim must be that.
    default_head_dim = cfg.d_model // att.n_heads if cfg.d_model % att.n_heads == 0 else None
    _require(att.head_dim == default_head_dim, "attention.head_dim", att.head_dim, "olmoe", "d_model // n_heads")
    _softmax_router(cfg, moe, "olmoe")
    _require(moe.n_shared_experts == 0, "moe.n_shared_experts", moe.n_shared_experts, "olmoe", "0")
    _all_moe(cfg, "olmoe")
    out.update(
        intermediate_size=moe.expert_ffn_dim,
        num_experts=moe.n_routed_experts,
        norm_topk_prob=moe.norm_topk_prob,
        attention_bias=bias,
        clip_qkv=None,
    )
    return out


def _deepseek_v3(cfg: ModelConfig) -> dict[str, Any]:
    moe, out = _common(cfg, "deepseek_v3")
    att = cfg.attention
    mt = "deepseek_v3"
    _require(att.kind == "mla", "attention.kind", att.kind, mt, "'mla'")
    _require(moe.score_func == "sigmoid", "moe.score_func", moe.score_func, mt, "'sigmoid'")
    _require(moe.group_score == "top2_sum", "moe.group_score", moe.group_score, mt, "'top2_sum'")
    per_group = moe.n_routed_experts // moe.n_group
    _require(per_group >= 2, "moe.n_group", moe.n_group, mt, "at least 2 experts per group")
    first = cfg.n_dense_layers
    _require(
        cfg.moe_layer_ids == list(range(first, cfg.n_layers)),
        "moe layers",
        cfg.moe_layer_ids,
        mt,
        "dense layers first, then only MoE layers",
    )
    assert moe.shared_ffn_dim is not None
    shared_width = moe.n_shared_experts * moe.shared_ffn_dim
    ok = moe.n_shared_experts > 0 and shared_width % moe.expert_ffn_dim == 0
    multiple = f"a positive multiple of moe.expert_ffn_dim ({moe.expert_ffn_dim})"
    _require(ok, "moe.n_shared_experts * moe.shared_ffn_dim", shared_width, mt, multiple)
    out.update(
        num_key_value_heads=att.n_heads,
        intermediate_size=cfg.dense_ffn_dim,
        moe_intermediate_size=moe.expert_ffn_dim,
        n_routed_experts=moe.n_routed_experts,
        n_shared_experts=shared_width // moe.expert_ffn_dim,
        first_k_dense_replace=first,
        n_group=moe.n_group,
        topk_group=moe.topk_group,
        norm_topk_prob=moe.norm_topk_prob,
        routed_scaling_factor=moe.routed_scaling_factor,
        q_lora_rank=att.q_lora_rank,
        kv_lora_rank=att.kv_lora_rank,
        qk_nope_head_dim=att.qk_nope_head_dim,
        qk_rope_head_dim=att.qk_rope_head_dim,
        v_head_dim=att.v_head_dim,
        attention_bias=att.mla_bias,
        rope_interleave=att.rope_interleave,
    )
    return out


BUILDERS: dict[str, Callable[[ModelConfig], dict[str, Any]]] = {
    "mixtral": _mixtral,
    "qwen2_moe": _qwen2_moe,
    "qwen3_moe": _qwen3_moe,
    "olmoe": _olmoe,
    "deepseek_v3": _deepseek_v3,
}


def to_hf_config(cfg: ModelConfig, model_type: str | None = None) -> dict[str, Any]:
    """The ``config.json`` dict of ``cfg`` as HF ``model_type`` (inferred when None)."""
    model_type = model_type or infer_model_type(cfg)
    if model_type not in BUILDERS:
        raise UnsupportedError(f"model_type {model_type!r} cannot be written; supported: {sorted(BUILDERS)}")
    return BUILDERS[model_type](cfg)


__all__ = ["ARCHITECTURES", "BUILDERS", "infer_model_type", "to_hf_config"]
