"""Phi-3.5-MoE (``phimoe``): LayerNorm with biases, attention and lm_head biases, sparsemixer top-2.

Every layer is MoE. The router is PhiMoE's sparsemixer (``moe.router = "sparsemixer"``, see
``moekit.layers.router``), which always picks two experts whatever ``num_experts_per_tok`` says,
as transformers does; ``router_jitter_noise`` is its masking threshold. Checkpoints keep the
sparse block as ``block_sparse_moe`` with a ``gate`` and experts ``w1``/``w3``/``w2`` (transformers
5's in-memory ``mlp.router`` and fused experts load too). Phi-3.5-MoE's LongRoPE is computed as
transformers 5 does (``moekit.layers.rope``). Refused: sliding windows shorter than the context.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from moekit.config import ModelConfig
from moekit.interop.types._base import HFLayout, ModelType, refused
from moekit.interop.types._reader import MISSING, Reader, common, make
from moekit.interop.types._rewrite import rename
from moekit.interop.types._writer import all_moe, gqa, require, softmax_router
from moekit.interop.types._writer import common as write_common

ARCHITECTURE = "PhimoeForCausalLM"


def read(r: Reader) -> ModelConfig:
    base = common(r, eps_default=1e-5, theta_default=1e6)
    bias = r.bool("attention_bias", False)
    base["attention"].update(qkv_bias=bias, o_bias=bias)
    r.int("num_experts_per_tok", 2)  # type-checked; sparsemixer routes to two experts regardless
    moe = dict(
        n_routed_experts=r.int("num_local_experts", MISSING, "num_experts"),
        top_k=2,
        expert_ffn_dim=r.int("intermediate_size"),
        router="sparsemixer",
        sparsemixer_eps=r.float("router_jitter_noise", 0.01),
    )
    return make(
        r,
        base,
        dense_ffn_dim=r.int("intermediate_size"),
        moe=moe,
        moe_ids=list(range(base["n_layers"])),
        norm="layernorm",
        lm_head_bias=r.bool("lm_head_bias", False),
    )


def write(cfg: ModelConfig) -> dict[str, Any]:
    mt = "phimoe"
    moe, out = write_common(cfg, mt, ARCHITECTURE, norm="layernorm", router="sparsemixer", lm_head_bias=True)
    bias = gqa(cfg, mt, "none", "all")
    softmax_router(cfg, moe, mt)
    require(moe.n_shared_experts == 0, "moe.n_shared_experts", moe.n_shared_experts, mt, "0")
    all_moe(cfg, mt)
    out.update(
        intermediate_size=moe.expert_ffn_dim,
        num_local_experts=moe.n_routed_experts,
        attention_bias=bias,
        lm_head_bias=cfg.lm_head_bias,
        router_jitter_noise=moe.sparsemixer_eps,
        input_jitter_noise=0.0,
        sliding_window=None,
    )
    return out


def refuse(d: dict[str, Any]) -> None:
    window = d.get("sliding_window")
    if window is not None and window < d.get("max_position_embeddings", 0):
        raise refused(d, "sliding_window", "sliding-window attention is not implemented")


def from_file(tensors: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """transformers 5's in-memory router name (``mlp.router``) as the hub's ``block_sparse_moe.gate``."""
    return rename(tensors, [(r"\.(?:mlp|block_sparse_moe)\.router\.weight$", ".block_sparse_moe.gate.weight")])


PHIMOE = ModelType(
    "phimoe",
    read=read,
    write=write,
    architecture=ARCHITECTURE,
    layout=HFLayout("block_sparse_moe", ("w1", "w3", "w2"), from_file=from_file),
    refuse=refuse,
    claims=lambda cfg: cfg.moe.router == "sparsemixer",
)
