"""OLMoE (``olmoe``): q/k RMSNorm over the whole projection, softmax top-k experts in every layer."""

from __future__ import annotations

from typing import Any

from moekit.config import ModelConfig
from moekit.interop.types._base import GATE_UP_DOWN, HFLayout, ModelType, UnsupportedError
from moekit.interop.types._reader import MISSING, Reader, common, make
from moekit.interop.types._writer import all_moe, gqa, require, softmax_router
from moekit.interop.types._writer import common as write_common

ARCHITECTURE = "OlmoeForCausalLM"


def read(r: Reader) -> ModelConfig:
    base = common(r)
    bias = r.bool("attention_bias", False)
    r.reject(
        "head_dim", lambda v: v != base["d_model"] // base["attention"]["n_heads"], "OLMoE's q_norm is hidden_size wide"
    )
    base["attention"].update(qkv_bias=bias, o_bias=bias, qk_norm="full")
    moe = dict(
        n_routed_experts=r.int("num_experts", MISSING, "num_local_experts"),
        top_k=r.int("num_experts_per_tok"),
        expert_ffn_dim=r.int("intermediate_size"),
        norm_topk_prob=r.bool("norm_topk_prob", False),
    )
    return make(r, base, dense_ffn_dim=r.int("intermediate_size"), moe=moe, moe_ids=list(range(base["n_layers"])))


def write(cfg: ModelConfig) -> dict[str, Any]:
    moe, out = write_common(cfg, "olmoe", ARCHITECTURE)
    bias = gqa(cfg, "olmoe", "full", "all")
    att = cfg.attention
    # OLMoE sizes its q/k norms from hidden_size // num_attention_heads, so head_dim must be that.
    default_head_dim = cfg.d_model // att.n_heads if cfg.d_model % att.n_heads == 0 else None
    require(att.head_dim == default_head_dim, "attention.head_dim", att.head_dim, "olmoe", "d_model // n_heads")
    softmax_router(cfg, moe, "olmoe")
    require(moe.n_shared_experts == 0, "moe.n_shared_experts", moe.n_shared_experts, "olmoe", "0")
    all_moe(cfg, "olmoe")
    out.update(
        intermediate_size=moe.expert_ffn_dim,
        num_experts=moe.n_routed_experts,
        norm_topk_prob=moe.norm_topk_prob,
        attention_bias=bias,
        clip_qkv=None,
    )
    return out


def refuse(d: dict[str, Any]) -> None:
    if d.get("clip_qkv") is not None:
        raise UnsupportedError(
            f"config.json (model_type olmoe): 'clip_qkv' = {d['clip_qkv']!r} is not supported: "
            "q/k/v clamping is not implemented"
        )


OLMOE = ModelType(
    "olmoe",
    read=read,
    write=write,
    architecture=ARCHITECTURE,
    layout=HFLayout("mlp", GATE_UP_DOWN),
    refuse=refuse,
    claims=lambda cfg: (
        cfg.attention.kind != "mla" and not cfg.moe.shared_expert_gate and cfg.attention.qk_norm == "full"
    ),
)
