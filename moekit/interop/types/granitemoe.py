"""IBM Granite MoE (``granitemoe``, ``granitemoeshared``): Mixtral-like layers with Granite's multipliers.

The embeddings are multiplied by ``embedding_multiplier``, every attention and FFN output by
``residual_multiplier`` before it joins the residual stream, the logits divided by
``logits_scaling``, and attention scores scaled by ``attention_multiplier`` instead of
1/sqrt(head_dim) (moekit: ``embedding_multiplier``, ``residual_multiplier``, ``logits_divisor``,
``attention.softmax_scale``). The router is top-k of the logits, then softmax over the chosen
(= moekit's softmax top-k renormalised). ``granitemoeshared`` adds an ungated shared expert of
width ``shared_intermediate_size`` (none when 0).

Files keep experts fused: ``block_sparse_moe.input_linear.weight [E, 2F, D]`` (gate rows, then up)
and ``output_linear.weight [E, D, F]``, the router as ``router.layer``, the shared expert as
``shared_mlp.input_linear [2S, D]`` / ``output_linear [D, S]``; transformers 5's in-memory names
(``router.weight``, ``experts.gate_up_proj``) load too.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import Tensor

from moekit.config import ModelConfig
from moekit.interop.types._base import GATE_UP_DOWN, HFLayout, ModelType
from moekit.interop.types._reader import MISSING, Reader, common, make
from moekit.interop.types._rewrite import pop_experts, rename, split_gate_up
from moekit.interop.types._writer import all_moe, gqa, require, softmax_router
from moekit.interop.types._writer import common as write_common

MULTIPLIERS = ("embedding_multiplier", "residual_multiplier", "logits_divisor", "attention.softmax_scale")


def read(r: Reader, shared: bool) -> ModelConfig:
    base = common(r)
    bias = r.bool("attention_bias", False)
    base["attention"].update(qkv_bias=bias, o_bias=bias, softmax_scale=r.float("attention_multiplier", 1.0))
    width = r.int("shared_intermediate_size", 0) if shared else 0
    moe = dict(
        n_routed_experts=r.int("num_local_experts", MISSING, "num_experts"),
        top_k=r.int("num_experts_per_tok"),
        expert_ffn_dim=r.int("intermediate_size"),
        n_shared_experts=1 if width > 0 else 0,
        shared_ffn_dim=width if width > 0 else None,
    )
    return make(
        r,
        base,
        dense_ffn_dim=r.int("intermediate_size"),
        moe=moe,
        moe_ids=list(range(base["n_layers"])),
        embedding_multiplier=r.float("embedding_multiplier", 1.0),
        residual_multiplier=r.float("residual_multiplier", 1.0),
        logits_divisor=r.float("logits_scaling", 1.0),
    )


def write(cfg: ModelConfig, mt: str, architecture: str) -> dict[str, Any]:
    moe, out = write_common(cfg, mt, architecture, writes=MULTIPLIERS)
    bias = gqa(cfg, mt, "none", "all")
    softmax_router(cfg, moe, mt)
    require(moe.norm_topk_prob, "moe.norm_topk_prob", False, mt, "True")
    require(not moe.shared_expert_gate, "moe.shared_expert_gate", True, mt, "False")
    if mt == "granitemoe":
        require(moe.n_shared_experts == 0, "moe.n_shared_experts", moe.n_shared_experts, mt, "0 (granitemoeshared)")
    else:
        assert moe.shared_ffn_dim is not None
        out["shared_intermediate_size"] = moe.n_shared_experts * moe.shared_ffn_dim
    all_moe(cfg, mt)
    att = cfg.attention
    assert att.head_dim is not None
    out.update(
        intermediate_size=moe.expert_ffn_dim,
        num_local_experts=moe.n_routed_experts,
        attention_bias=bias,
        attention_multiplier=att.softmax_scale if att.softmax_scale is not None else att.head_dim**-0.5,
        embedding_multiplier=cfg.embedding_multiplier,
        residual_multiplier=cfg.residual_multiplier,
        logits_scaling=cfg.logits_divisor,
    )
    return out


def from_file(tensors: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    out = rename(
        tensors,
        [
            (r"\.block_sparse_moe\.router\.(?:layer\.)?weight$", ".block_sparse_moe.gate.weight"),
            (r"\.block_sparse_moe\.input_linear\.weight$", ".block_sparse_moe.experts.gate_up_proj"),
            (r"\.block_sparse_moe\.output_linear\.weight$", ".block_sparse_moe.experts.down_proj"),
            (r"\.shared_mlp\.output_linear\.weight$", ".block_sparse_moe.shared_mlp.down_proj.weight"),
        ],
    )
    if cfg.moe is None or not cfg.moe.n_shared_experts:
        return out  # a shared_mlp in the file is reported as unexpected
    assert cfg.moe.shared_ffn_dim is not None
    for name in [n for n in out if n.endswith(".shared_mlp.input_linear.weight")]:
        prefix = name.removesuffix("shared_mlp.input_linear.weight") + "block_sparse_moe.shared_mlp."
        width = cfg.moe.n_shared_experts * cfg.moe.shared_ffn_dim
        split_gate_up(out, name, prefix + "gate_proj.weight", prefix + "up_proj.weight", width)
    return out


def to_file(tensors: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    out = dict(tensors)
    for i, (gate, up, down) in pop_experts(out, cfg, "block_sparse_moe", GATE_UP_DOWN).items():
        out[f"model.layers.{i}.block_sparse_moe.input_linear.weight"] = torch.cat([gate, up], dim=1)
        out[f"model.layers.{i}.block_sparse_moe.output_linear.weight"] = down
    shared = re.compile(r"model\.layers\.(\d+)\.block_sparse_moe\.shared_mlp\.gate_proj\.weight")
    for name in [n for n in out if shared.fullmatch(n)]:
        prefix = name.removesuffix("gate_proj.weight")
        layer = f"model.layers.{shared.fullmatch(name).group(1)}.shared_mlp."
        gate, up = out.pop(name), out.pop(prefix + "up_proj.weight")
        out[layer + "input_linear.weight"] = torch.cat([gate, up])
        out[layer + "output_linear.weight"] = out.pop(prefix + "down_proj.weight")
    return rename(out, [(r"\.block_sparse_moe\.gate\.weight$", ".block_sparse_moe.router.layer.weight")])


def _layout(shared: bool) -> HFLayout:
    return HFLayout(
        "block_sparse_moe",
        GATE_UP_DOWN,
        shared="shared_mlp" if shared else None,
        from_file=from_file,
        to_file=to_file,
    )


def _granite(cfg: ModelConfig) -> bool:
    multipliers = [getattr(cfg, f) for f in ("embedding_multiplier", "residual_multiplier", "logits_divisor")]
    return cfg.attention.kind == "gqa" and (
        any(m != 1.0 for m in multipliers) or cfg.attention.softmax_scale is not None
    )


GRANITEMOE = ModelType(
    "granitemoe",
    read=lambda r: read(r, shared=False),
    write=lambda cfg: write(cfg, "granitemoe", "GraniteMoeForCausalLM"),
    architecture="GraniteMoeForCausalLM",
    layout=_layout(shared=False),
    claims=lambda cfg: _granite(cfg) and cfg.moe.n_shared_experts == 0,
)
GRANITEMOESHARED = ModelType(
    "granitemoeshared",
    read=lambda r: read(r, shared=True),
    write=lambda cfg: write(cfg, "granitemoeshared", "GraniteMoeSharedForCausalLM"),
    architecture="GraniteMoeSharedForCausalLM",
    layout=_layout(shared=True),
    claims=lambda cfg: _granite(cfg) and cfg.moe.n_shared_experts > 0 and not cfg.moe.shared_expert_gate,
)
