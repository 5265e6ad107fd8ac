"""Qwen1.5/Qwen2-MoE (``qwen2_moe``): q/k/v biases, a sigmoid-gated shared expert beside the routed ones.

Layer placement (transformers' Qwen2MoeDecoderLayer): layer i is MoE iff i is not in
``mlp_only_layers``, ``num_experts > 0`` and ``(i + 1) % decoder_sparse_step == 0``.
"""

from __future__ import annotations

from typing import Any

from moekit.config import ConfigError, ModelConfig
from moekit.interop.types._base import GATE_UP_DOWN, HFLayout, ModelType, UnsupportedError
from moekit.interop.types._reader import Reader, common, make
from moekit.interop.types._writer import common as write_common
from moekit.interop.types._writer import gqa, qwen_placement, require, softmax_router

ARCHITECTURE = "Qwen2MoeForCausalLM"


def qwen_moe_ids(r: Reader, n_layers: int, n_experts: int) -> list[int]:
    """The MoE layers under Qwen's rule (shared with qwen3_moe)."""
    dense = set(r.int_list("mlp_only_layers", []))
    step = r.int("decoder_sparse_step", 1)
    if step < 1:
        raise ConfigError(f"{r.where}: 'decoder_sparse_step' must be >= 1, got {step}")
    if n_experts <= 0:
        return []
    return [i for i in range(n_layers) if i not in dense and (i + 1) % step == 0]


def refuse_sliding_window(d: dict[str, Any]) -> None:
    if d.get("use_sliding_window"):
        raise UnsupportedError(
            f"config.json (model_type {d.get('model_type')}): 'use_sliding_window' = True is not supported: "
            "sliding-window attention is not implemented"
        )


def read(r: Reader) -> ModelConfig:
    base = common(r)
    base["attention"]["qkv_bias"] = r.bool("qkv_bias", True)  # Qwen2: q/k/v biased, o not
    e = r.int("num_experts", 0, "num_local_experts")
    shared = r.int("shared_expert_intermediate_size", 0)
    if e > 0 and shared <= 0:
        # transformers still builds the sigmoid gate (d parameters) around a width-0 expert.
        raise ConfigError(f"{r.where}: 'shared_expert_intermediate_size' = {shared} is not supported (need > 0)")
    moe = dict(
        n_routed_experts=max(e, 1),
        top_k=r.int("num_experts_per_tok", 1),
        expert_ffn_dim=r.int("moe_intermediate_size", 1),
        n_shared_experts=1,
        shared_ffn_dim=shared if shared > 0 else None,
        shared_expert_gate=True,
        norm_topk_prob=r.bool("norm_topk_prob", False),
    )
    ids = qwen_moe_ids(r, base["n_layers"], e)
    return make(r, base, dense_ffn_dim=r.int("intermediate_size"), moe=moe if ids else None, moe_ids=ids)


def write(cfg: ModelConfig) -> dict[str, Any]:
    moe, out = write_common(cfg, "qwen2_moe", ARCHITECTURE)
    qkv_bias = gqa(cfg, "qwen2_moe", "none", "qkv")
    softmax_router(cfg, moe, "qwen2_moe")
    require(moe.n_shared_experts > 0, "moe.n_shared_experts", moe.n_shared_experts, "qwen2_moe", ">= 1")
    require(moe.shared_expert_gate, "moe.shared_expert_gate", False, "qwen2_moe", "True")
    assert moe.shared_ffn_dim is not None
    out.update(
        intermediate_size=cfg.dense_ffn_dim,
        moe_intermediate_size=moe.expert_ffn_dim,
        shared_expert_intermediate_size=moe.n_shared_experts * moe.shared_ffn_dim,
        num_experts=moe.n_routed_experts,
        norm_topk_prob=moe.norm_topk_prob,
        qkv_bias=qkv_bias,
        use_sliding_window=False,
        **qwen_placement(cfg),
    )
    return out


QWEN2_MOE = ModelType(
    "qwen2_moe",
    read=read,
    write=write,
    architecture=ARCHITECTURE,
    layout=HFLayout("mlp", GATE_UP_DOWN, shared="shared_expert"),
    refuse=refuse_sliding_window,
    claims=lambda cfg: cfg.attention.kind != "mla" and cfg.moe.shared_expert_gate,
)
