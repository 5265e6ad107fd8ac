"""Hunyuan-MoE (``hunyuan_v1_moe``): per-head q/k RMSNorm after rotary, a shared MLP in every MoE layer.

- q/k norms: ``RMSNorm(head_dim)`` shared by heads, applied to the rotated q/k
  (``attention.qk_norm = "head"`` with ``qk_norm_after_rope``); files name them
  ``query_layernorm`` / ``key_layernorm``.
- Router ``mlp.gate.wg`` (kept fp32 by transformers): fp32 softmax, top-k, renormalised.
- Every layer is MoE with ``num_experts`` experts and one ungated shared MLP, all of width
  ``intermediate_size``. ``num_experts`` / ``moe_topk`` may be per-layer lists: moekit takes
  them when every layer has the same value and refuses them otherwise.
- Rotary: a "dynamic" rope with a fixed NTK ``alpha`` (Hunyuan-A13B) only stretches the base,
  ``theta * alpha ** (d / (d - 2))``, so it is read as that rope_theta.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from moekit.config import ModelConfig
from moekit.interop.types._base import GATE_UP_DOWN, HFLayout, ModelType
from moekit.interop.types._reader import Reader, common, constant, make
from moekit.interop.types._rewrite import rename
from moekit.interop.types._writer import all_moe, gqa, require, softmax_router
from moekit.interop.types._writer import common as write_common

ARCHITECTURE = "HunYuanMoEV1ForCausalLM"


def read(r: Reader) -> ModelConfig:
    base = common(r, eps_default=1e-5)
    att = base["attention"]
    bias = r.bool("attention_bias", False)
    att.update(qkv_bias=bias, o_bias=bias, qk_norm="head", qk_norm_after_rope=True)
    scaling = att.get("rope_scaling") or {}
    if scaling.get("rope_type", scaling.get("type")) == "dynamic" and scaling.get("alpha"):
        head_dim = att["head_dim"] or base["d_model"] // att["n_heads"]
        att["rope_theta"] *= float(scaling["alpha"]) ** (head_dim / (head_dim - 2))
        del att["rope_scaling"]
    n_layers, width = base["n_layers"], r.int("intermediate_size", 11008)
    moe = dict(
        n_routed_experts=constant(r, "num_experts", 1, n_layers=n_layers),
        top_k=constant(r, "moe_topk", 1, "num_experts_per_tok", n_layers=n_layers),
        expert_ffn_dim=width,
        n_shared_experts=1,
    )
    return make(r, base, dense_ffn_dim=width, moe=moe, moe_ids=list(range(n_layers)))


def write(cfg: ModelConfig) -> dict[str, Any]:
    mt = "hunyuan_v1_moe"
    moe, out = write_common(cfg, mt, ARCHITECTURE, writes=("attention.qk_norm_after_rope",))
    bias = gqa(cfg, mt, "head", "all")
    require(cfg.attention.qk_norm_after_rope, "attention.qk_norm_after_rope", False, mt, "True")
    softmax_router(cfg, moe, mt)
    require(moe.norm_topk_prob, "moe.norm_topk_prob", False, mt, "True")
    shared_ok = moe.n_shared_experts == 1 and not moe.shared_expert_gate and moe.shared_ffn_dim == moe.expert_ffn_dim
    require(shared_ok, "moe.n_shared_experts", moe.n_shared_experts, mt, "1 ungated, of width moe.expert_ffn_dim")
    all_moe(cfg, mt)
    out.update(
        intermediate_size=moe.expert_ffn_dim,
        num_experts=moe.n_routed_experts,
        moe_topk=moe.top_k,
        attention_bias=bias,
    )
    del out["num_experts_per_tok"]
    return out


def from_file(tensors: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    return rename(
        tensors,
        [
            (r"\.mlp\.gate\.wg\.weight$", ".mlp.gate.weight"),
            (r"\.self_attn\.query_layernorm\.", ".self_attn.q_norm."),
            (r"\.self_attn\.key_layernorm\.", ".self_attn.k_norm."),
        ],
    )


def to_file(tensors: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    return rename(
        tensors,
        [
            (r"\.mlp\.gate\.weight$", ".mlp.gate.wg.weight"),
            (r"\.self_attn\.q_norm\.", ".self_attn.query_layernorm."),
            (r"\.self_attn\.k_norm\.", ".self_attn.key_layernorm."),
        ],
    )


HUNYUAN_V1_MOE = ModelType(
    "hunyuan_v1_moe",
    read=read,
    write=write,
    architecture=ARCHITECTURE,
    layout=HFLayout("mlp", GATE_UP_DOWN, shared="shared_mlp", from_file=from_file, to_file=to_file),
    claims=lambda cfg: cfg.attention.qk_norm_after_rope,
)
