"""Writing Hugging Face ``config.json`` dicts: the checks and keys the exportable types share.

Each writer first checks that the config is expressible in its model type and raises
``UnsupportedError`` naming the first field that is not (say, ``moe.capacity_factor``:
transformers' MoE blocks never drop tokens). Training-only settings (balancing coefficients,
noise) do not change the forward pass and are not written. Rope settings are written in the
legacy ``rope_theta``/``rope_scaling`` form, which every transformers release since 4.56 reads.
"""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar
from typing import Any

from moekit.config import ModelConfig, MoEConfig
from moekit.interop.types._base import UnsupportedError

# Settings only some types express, with their neutral values: a type writes them only when it
# names them in ``common(..., writes=...)``; for every other type they must be neutral.
OPTIONAL_SETTINGS: dict[str, Any] = {
    "embedding_multiplier": 1.0,
    "residual_multiplier": 1.0,
    "logits_divisor": 1.0,
    "attention.softmax_scale": None,
    "attention.clip_qkv": None,
    "attention.qk_norm_after_rope": False,
    "attention.partial_rotary_factor": 1.0,
    "dense_ffn_bias": False,
    "moe.shared_expert_bias": False,
}

# While ``mismatches`` runs a writer, ``require`` records every failed check here instead of raising.
_FOUND: ContextVar[list[str] | None] = ContextVar("_FOUND", default=None)


def setting(cfg: ModelConfig, field: str) -> Any:
    node: Any = cfg
    for part in field.split("."):
        node = getattr(node, part)
    return node


def require(ok: bool, field: str, value: Any, model_type: str, expected: str) -> None:
    if ok:
        return
    found = _FOUND.get()
    if found is None:
        raise UnsupportedError(f"{field}={value!r} cannot be written as model_type {model_type!r}: expected {expected}")
    found.append(f"{field}={value!r} (expected {expected})")


def mismatches(write: Callable[[ModelConfig], dict[str, Any]], cfg: ModelConfig) -> list[str]:
    """Every field of ``cfg`` that ``write``'s model type cannot express (empty: it can)."""
    found: list[str] = []
    token = _FOUND.set(found)
    try:
        write(cfg)
    except UnsupportedError as e:  # a check that cannot go on (no MoE config at all)
        found.append(str(e))
    except (AssertionError, ArithmeticError, TypeError, ValueError) as e:  # a check past a failed one
        if not found:
            found.append(f"{type(e).__name__}: {e}")
    finally:
        _FOUND.reset(token)
    return found


def common(
    cfg: ModelConfig,
    model_type: str,
    architecture: str,
    writes: tuple[str, ...] = (),
    *,
    norm: str = "rmsnorm",
    router: str = "topk",
    lm_head_bias: bool = False,
) -> tuple[MoEConfig, dict[str, Any]]:
    """Checks every supported type shares, and the keys every type writes.

    ``writes``: the fields the type expresses, which its writer writes and checks itself: any of
    the shared checks below (gpt-oss's ``attention.sinks``, Llama 4's ``attention.rope_interleave``)
    and the ``OPTIONAL_SETTINGS`` (each other one must be neutral). ``norm`` / ``router``: the
    type's (PhiMoE: "layernorm", "sparsemixer"); ``lm_head_bias``: the type may have one.
    """
    moe = cfg.moe
    if moe is None:
        raise UnsupportedError(f"moe is None: model_type {model_type!r} needs an MoE config")
    att = cfg.attention
    for field, value, ok, expected in [
        ("norm", cfg.norm, cfg.norm == norm, repr(norm)),
        ("lm_head_bias", cfg.lm_head_bias, lm_head_bias or not cfg.lm_head_bias, "False"),
        ("attention.sinks", att.sinks, not att.sinks, "False"),
        ("moe.router", moe.router, moe.router == router, repr(router)),
        ("moe.capacity_factor", moe.capacity_factor, moe.capacity_factor is None, "None (dropless)"),
        ("moe.router_bias", moe.router_bias, not moe.router_bias, "False"),
        ("moe.expert_bias", moe.expert_bias, not moe.expert_bias, "False"),
        ("moe.expert_activation", moe.expert_activation, moe.expert_activation == "swiglu", "'swiglu'"),
        ("attention.sliding_window", att.sliding_window, att.sliding_window is None, "None"),
        ("attention.chunk_size", att.chunk_size, att.chunk_size is None, "None"),
        ("attention.nope_layers", att.nope_layers, not att.nope_layers, "None"),
        ("moe.scale_expert_input", moe.scale_expert_input, not moe.scale_expert_input, "False"),
    ]:
        if field not in writes:
            require(ok, field, value, model_type, expected)
    for field, neutral in OPTIONAL_SETTINGS.items():
        if field not in writes:
            value = setting(cfg, field)
            require(value == neutral, field, value, model_type, repr(neutral))
    if att.kind != "mla" and "attention.rope_interleave" not in writes:
        require(not att.rope_interleave, "attention.rope_interleave", True, model_type, "False")
    out: dict[str, Any] = {
        "architectures": [architecture],
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


def softmax_router(cfg: ModelConfig, moe: MoEConfig, model_type: str) -> None:
    """Mixtral/Qwen/OLMoE routers: softmax over all experts, top-k, optional renormalisation."""
    for field, value, ok, expected in [
        ("moe.score_func", moe.score_func, moe.score_func == "softmax", "'softmax'"),
        ("moe.routed_scaling_factor", moe.routed_scaling_factor, moe.routed_scaling_factor == 1.0, "1.0"),
        ("moe.n_group", moe.n_group, moe.n_group == 1, "1"),
        ("moe.selection_bias", moe.uses_selection_bias, not moe.uses_selection_bias, "False"),
    ]:
        require(ok, field, value, model_type, expected)


def gqa(cfg: ModelConfig, model_type: str, qk_norm: str, biases: str) -> bool:
    """Check the attention; ``biases``: "qkv" (Qwen2-MoE), "all" (one attention_bias flag)."""
    att = cfg.attention
    require(att.kind == "gqa", "attention.kind", att.kind, model_type, "'gqa'")
    require(att.qk_norm == qk_norm, "attention.qk_norm", att.qk_norm, model_type, repr(qk_norm))
    if biases == "all":
        require(att.qkv_bias == att.o_bias, "attention.o_bias", att.o_bias, model_type, f"{att.qkv_bias} (= qkv_bias)")
    else:
        require(not att.o_bias, "attention.o_bias", att.o_bias, model_type, "False")
    return att.qkv_bias


def all_moe(cfg: ModelConfig, model_type: str) -> None:
    require(cfg.n_dense_layers == 0, "moe layers", cfg.moe_layer_ids, model_type, "every layer an MoE layer")


def qwen_placement(cfg: ModelConfig) -> dict[str, Any]:
    """Qwen: layer i is MoE iff i not in mlp_only_layers and (i + 1) % decoder_sparse_step == 0."""
    moe_ids = set(cfg.moe_layer_ids)
    return {"decoder_sparse_step": 1, "mlp_only_layers": [i for i in range(cfg.n_layers) if i not in moe_ids]}


def dense_first_shared_moe(cfg: ModelConfig, model_type: str) -> dict[str, Any]:
    """The DeepSeek-V3-layout MoE keys (DeepSeek-V2/V3, GLM-4.5, dots.llm1): dense layers first, then only
    MoE layers; shared experts ungated, as a positive multiple of the routed expert width."""
    moe = cfg.moe
    assert moe is not None and moe.shared_ffn_dim is not None
    first = cfg.n_dense_layers
    layers_ok = cfg.moe_layer_ids == list(range(first, cfg.n_layers))
    require(layers_ok, "moe layers", cfg.moe_layer_ids, model_type, "dense layers first, then only MoE layers")
    require(not moe.shared_expert_gate, "moe.shared_expert_gate", True, model_type, "False")
    shared_width = moe.n_shared_experts * moe.shared_ffn_dim
    ok = shared_width > 0 and shared_width % moe.expert_ffn_dim == 0
    multiple = f"a positive multiple of moe.expert_ffn_dim ({moe.expert_ffn_dim})"
    require(ok, "moe.n_shared_experts * moe.shared_ffn_dim", shared_width, model_type, multiple)
    return dict(
        intermediate_size=cfg.dense_ffn_dim,
        moe_intermediate_size=moe.expert_ffn_dim,
        n_routed_experts=moe.n_routed_experts,
        n_shared_experts=shared_width // moe.expert_ffn_dim,
        first_k_dense_replace=first,
        n_group=moe.n_group,
        topk_group=moe.topk_group,
        norm_topk_prob=moe.norm_topk_prob,
        routed_scaling_factor=moe.routed_scaling_factor,
    )
