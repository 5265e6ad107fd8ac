"""Mixtral (transformers ``mixtral``): GQA attention, every layer a softmax top-k MoE, no shared expert.

Checkpoints keep the sparse block as ``block_sparse_moe`` with experts ``w1``/``w3``/``w2``.
"""

from __future__ import annotations

from typing import Any

from moekit.config import ModelConfig
from moekit.interop.types._base import HFLayout, ModelType, UnsupportedError
from moekit.interop.types._reader import MISSING, Reader, common, make
from moekit.interop.types._writer import all_moe, gqa, require, softmax_router
from moekit.interop.types._writer import common as write_common

ARCHITECTURE = "MixtralForCausalLM"


def read(r: Reader) -> ModelConfig:
    base = common(r)
    e = r.int("num_local_experts", MISSING, "num_experts")
    moe = dict(n_routed_experts=e, top_k=r.int("num_experts_per_tok"), expert_ffn_dim=r.int("intermediate_size"))
    return make(r, base, dense_ffn_dim=r.int("intermediate_size"), moe=moe, moe_ids=list(range(base["n_layers"])))


def write(cfg: ModelConfig) -> dict[str, Any]:
    moe, out = write_common(cfg, "mixtral", ARCHITECTURE)
    gqa(cfg, "mixtral", "none", "all")
    require(not cfg.attention.qkv_bias, "attention.qkv_bias", True, "mixtral", "False")
    softmax_router(cfg, moe, "mixtral")
    require(moe.norm_topk_prob, "moe.norm_topk_prob", False, "mixtral", "True")
    require(moe.n_shared_experts == 0, "moe.n_shared_experts", moe.n_shared_experts, "mixtral", "0")
    all_moe(cfg, "mixtral")
    out.update(intermediate_size=moe.expert_ffn_dim, num_local_experts=moe.n_routed_experts, sliding_window=None)
    return out


def refuse(d: dict[str, Any]) -> None:
    window = d.get("sliding_window")
    if window is not None and window < d.get("max_position_embeddings", 0):
        raise UnsupportedError(
            f"config.json (model_type mixtral): 'sliding_window' = {window!r} is not supported: "
            "sliding-window attention is not implemented"
        )


def claims(cfg: ModelConfig) -> bool:
    a = cfg.attention
    plain = cfg.norm == "rmsnorm" and cfg.moe.router == "topk"  # else phimoe, ...
    return plain and a.kind != "mla" and not cfg.moe.shared_expert_gate and a.qk_norm not in ("head", "full")


MIXTRAL = ModelType(
    "mixtral",
    read=read,
    write=write,
    architecture=ARCHITECTURE,
    layout=HFLayout("block_sparse_moe", ("w1", "w3", "w2")),
    refuse=refuse,
    claims=claims,
)
