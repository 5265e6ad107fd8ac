"""MiniMax-M2 (``minimax_m2``): q/k RMSNorm over the whole projections, partial rotary, sigmoid routing.

- q/k norms: ``RMSNorm(H * d)`` / ``RMSNorm(G * d)`` over the whole projections, before rotary
  (``attention.qk_norm = "full"``, as OLMoE).
- Partial rotary: the first ``rotary_dim`` (hub key) of each head's ``head_dim`` dims are rotated,
  or ``partial_rotary_factor`` (transformers 5 keeps it in ``rope_parameters``).
- Router: sigmoid scores; experts chosen on scores + ``e_score_correction_bias`` (moekit's
  selection bias), weighted by the scores renormalised over the chosen. No shared experts, every
  layer MoE. Files: Mixtral-style ``block_sparse_moe`` with ``gate`` and ``w1``/``w3``/``w2``, the
  bias as ``block_sparse_moe.e_score_correction_bias`` (transformers 5's in-memory ``mlp.`` names
  load too).
- Defaults that differ: head_dim 128, rope theta 5e6.
- Its multi-token-prediction modules (``num_mtp_modules``) are neither in transformers' model nor in
  the published total; moekit does not count (or load) them.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from moekit.config import ConfigError, ModelConfig
from moekit.interop.types._base import HFLayout, ModelType
from moekit.interop.types._reader import MISSING, Reader, common, make
from moekit.interop.types._rewrite import rename
from moekit.interop.types._writer import all_moe, gqa, require
from moekit.interop.types._writer import common as write_common

ARCHITECTURE = "MiniMaxM2ForCausalLM"


def rotary_share(r: Reader, head_dim: int) -> float:
    """``rotary_dim / head_dim`` (hub), else ``partial_rotary_factor`` (top level or in rope_parameters)."""
    if r.get("rotary_dim", None) is not None:
        return r.int("rotary_dim") / head_dim
    params = r.get("rope_parameters", None)
    v = params.get("partial_rotary_factor") if isinstance(params, dict) else None
    v = r.get("partial_rotary_factor", 1.0) if v is None else v
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ConfigError(f"{r.where}: 'partial_rotary_factor' must be a number, got {v!r}")
    return float(v)


def read(r: Reader) -> ModelConfig:
    base = common(r, theta_default=5e6)
    att = base["attention"]
    att["head_dim"] = r.int("head_dim", 128)
    att.update(qk_norm="full", partial_rotary_factor=rotary_share(r, att["head_dim"]))
    if att.get("rope_scaling"):
        att["rope_scaling"].pop("partial_rotary_factor", None)
    moe = dict(
        n_routed_experts=r.int("num_local_experts", MISSING, "num_experts"),
        top_k=r.int("num_experts_per_tok"),
        expert_ffn_dim=r.int("intermediate_size"),
        score_func="sigmoid",
        selection_bias=True,
    )
    return make(r, base, dense_ffn_dim=r.int("intermediate_size"), moe=moe, moe_ids=list(range(base["n_layers"])))


def write(cfg: ModelConfig) -> dict[str, Any]:
    mt = "minimax_m2"
    moe, out = write_common(cfg, mt, ARCHITECTURE, writes=("attention.partial_rotary_factor",))
    bias = gqa(cfg, mt, "full", "all")
    require(not bias, "attention.qkv_bias", bias, mt, "False")
    for field, value, ok, expected in [
        ("moe.score_func", moe.score_func, moe.score_func == "sigmoid", "'sigmoid'"),
        ("moe.norm_topk_prob", moe.norm_topk_prob, moe.norm_topk_prob, "True"),
        ("moe.routed_scaling_factor", moe.routed_scaling_factor, moe.routed_scaling_factor == 1.0, "1.0"),
        ("moe.n_group", moe.n_group, moe.n_group == 1, "1"),
        ("moe.n_shared_experts", moe.n_shared_experts, moe.n_shared_experts == 0, "0"),
    ]:
        require(ok, field, value, mt, expected)
    all_moe(cfg, mt)
    out.update(
        intermediate_size=moe.expert_ffn_dim,
        num_local_experts=moe.n_routed_experts,
        rotary_dim=cfg.attention.rotary_dim,
    )
    return out


def from_file(tensors: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    bias = r"\.(?:mlp|block_sparse_moe)\.e_score_correction_bias$"
    return rename(tensors, [(bias, ".block_sparse_moe.gate.e_score_correction_bias")])


def to_file(tensors: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    bias = r"\.block_sparse_moe\.gate\.e_score_correction_bias$"
    return rename(tensors, [(bias, ".block_sparse_moe.e_score_correction_bias")])


MINIMAX_M2 = ModelType(
    "minimax_m2",
    read=read,
    write=write,
    architecture=ARCHITECTURE,
    layout=HFLayout("block_sparse_moe", ("w1", "w3", "w2"), selection_bias=True, from_file=from_file, to_file=to_file),
    claims=lambda cfg: (
        cfg.attention.kind == "gqa" and cfg.attention.qk_norm == "full" and cfg.moe.score_func == "sigmoid"
    ),
    partial_rotary=True,
)
