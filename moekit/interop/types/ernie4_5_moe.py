"""ERNIE-4.5 MoE (``ernie4_5_moe``): interleaved rotary, an always-present selection bias, shared experts.

- Rotary pairs are interleaved (``x[2i], x[2i+1]`` rotate together): ``attention.rope_interleave``.
- Router: fp32 softmax; the experts are chosen on softmax + ``moe_statics.e_score_correction_bias``
  (a ``[1, E]`` tensor in every MoE layer; moekit's selection bias), weighted by the softmax
  renormalised over the chosen (the sum clamped below by ``moe_norm_min``, 1e-12).
- ``moe_num_shared_experts`` ungated shared experts of width ``moe_intermediate_size``.
- Placement: layer i is MoE iff ``(i + 1) % moe_layer_interval == 0`` and
  ``moe_layer_start_index <= i <= moe_layer_end_index`` (-1: the last layer).
- ``use_bias`` puts biases on q/k/v/o, the dense and shared FFNs (``dense_ffn_bias``,
  ``moe.shared_expert_bias``) and the head; the routed experts and the router never have one.
- Defaults that differ from other types: tied embeddings, rms_norm_eps 1e-5, rope theta 5e5.

Counting: transformers keeps ``e_score_correction_bias`` as a (frozen) parameter, moekit as a
buffer, so the accountant adds it under ``routers`` (E per MoE layer) to the reader's count.
Source: transformers' ``modeling_ernie4_5_moe.py``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import Tensor

from moekit.accounting import Counted, Term, count_extended, model_components
from moekit.config import ModelConfig
from moekit.interop.types._base import GATE_UP_DOWN, HFLayout, ModelType, refused
from moekit.interop.types._reader import Reader, common, make
from moekit.interop.types._rewrite import rename
from moekit.interop.types._writer import common as write_common
from moekit.interop.types._writer import gqa, require

ARCHITECTURE = "Ernie4_5_MoeForCausalLM"


def moe_ids(n_layers: int, start: int, end: int, interval: int) -> list[int]:
    end = n_layers - 1 if end == -1 else end
    return [i for i in range(n_layers) if (i + 1) % interval == 0 and start <= i <= end]


def read(r: Reader) -> ModelConfig:
    base = common(r, eps_default=1e-5, theta_default=5e5)
    base["tie_embeddings"] = r.bool("tie_word_embeddings", True)
    bias = r.bool("use_bias", False)
    base["attention"].update(qkv_bias=bias, o_bias=bias)
    base["attention"]["rope_interleave"] = True
    n_layers = base["n_layers"]
    ids = moe_ids(
        n_layers,
        r.int("moe_layer_start_index", 1),
        r.int("moe_layer_end_index", -1),
        r.int("moe_layer_interval", 1),
    )
    shared = r.int("moe_num_shared_experts", 2)
    moe = dict(
        n_routed_experts=r.int("moe_num_experts", 64, "num_experts"),
        top_k=r.int("moe_k", 6, "num_experts_per_tok"),
        expert_ffn_dim=r.int("moe_intermediate_size", 1536),
        n_shared_experts=shared,
        shared_expert_bias=bias,
        selection_bias=True,
    )
    return make(
        r,
        base,
        dense_ffn_dim=r.int("intermediate_size", 12288),
        moe=moe,
        moe_ids=ids,
        dense_ffn_bias=bias,
        lm_head_bias=bias,
    )


def account(r: Reader) -> Counted:
    """The reader's count plus the router's selection-bias parameter (see the module docstring)."""
    cfg = read(r)
    if cfg.moe is None:
        return count_extended(cfg)
    own = next(c for c in model_components(cfg) if c.name == "routers")
    selection = Term("e_score_correction_bias", (cfg.moe.n_routed_experts,), matmul=False)
    return count_extended(cfg, replace={"routers": dataclasses.replace(own, terms=(*own.terms, selection))})


def write(cfg: ModelConfig) -> dict[str, Any]:
    mt = "ernie4_5_moe"
    writes = ("attention.rope_interleave", "dense_ffn_bias", "moe.shared_expert_bias")
    moe, out = write_common(cfg, mt, ARCHITECTURE, lm_head_bias=True, writes=writes)
    att = cfg.attention
    bias = gqa(cfg, mt, "none", "all")  # use_bias: attention, dense and shared FFN biases together
    require(cfg.dense_ffn_bias == bias, "dense_ffn_bias", cfg.dense_ffn_bias, mt, f"{bias} (= attention biases)")
    require(cfg.lm_head_bias == bias, "lm_head_bias", cfg.lm_head_bias, mt, f"{bias} (= attention biases)")
    ok = moe.shared_expert_bias == bias or moe.n_shared_experts == 0
    require(ok, "moe.shared_expert_bias", moe.shared_expert_bias, mt, f"{bias} (= attention biases)")
    require(att.rope_interleave, "attention.rope_interleave", False, mt, "True")
    for field, value, ok, expected in [
        ("moe.score_func", moe.score_func, moe.score_func == "softmax", "'softmax'"),
        ("moe.norm_topk_prob", moe.norm_topk_prob, moe.norm_topk_prob, "True"),
        ("moe.routed_scaling_factor", moe.routed_scaling_factor, moe.routed_scaling_factor == 1.0, "1.0"),
        ("moe.n_group", moe.n_group, moe.n_group == 1, "1"),
        ("moe.shared_expert_gate", moe.shared_expert_gate, not moe.shared_expert_gate, "False"),
        ("moe.shared_ffn_dim", moe.shared_ffn_dim, moe.shared_ffn_dim == moe.expert_ffn_dim, "moe.expert_ffn_dim"),
    ]:
        require(ok, field, value, mt, expected)
    ids = cfg.moe_layer_ids or [cfg.n_layers]  # none: refused just below
    step = ids[1] - ids[0] if len(ids) > 1 else ids[0] + 1
    ok = moe_ids(cfg.n_layers, ids[0], ids[-1], step) == cfg.moe_layer_ids != []
    require(
        ok, "moe layers", cfg.moe_layer_ids, mt, "every moe_layer_interval-th layer (i + 1 divisible), start to end"
    )
    out.update(
        intermediate_size=cfg.dense_ffn_dim,
        moe_intermediate_size=moe.expert_ffn_dim,
        moe_num_experts=moe.n_routed_experts,
        moe_k=moe.top_k,
        moe_num_shared_experts=moe.n_shared_experts,
        moe_layer_start_index=ids[0],
        moe_layer_end_index=ids[-1],
        moe_layer_interval=step,
        use_bias=bias,
    )
    del out["num_experts_per_tok"]
    return out


def refuse(d: dict[str, Any]) -> None:
    if float(d.get("moe_norm_min", 1e-12)) > 1e-6:
        raise refused(d, "moe_norm_min", "moekit renormalises by the weights' sum, clamped at 1e-20 only")


def from_file(tensors: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    out = rename(
        tensors, [(r"\.mlp\.(?:gate\.)?moe_statics\.e_score_correction_bias$", ".mlp.gate.e_score_correction_bias")]
    )
    for name, t in out.items():
        if name.endswith("gate.e_score_correction_bias") and t.dim() == 2 and t.shape[0] == 1:
            out[name] = t.view(-1)
    return out


def to_file(tensors: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    out = {k: v.view(1, -1) if k.endswith("gate.e_score_correction_bias") else v for k, v in tensors.items()}
    return rename(out, [(r"\.mlp\.gate\.e_score_correction_bias$", ".mlp.moe_statics.e_score_correction_bias")])


ERNIE4_5_MOE = ModelType(
    "ernie4_5_moe",
    read=read,
    account=account,
    write=write,
    architecture=ARCHITECTURE,
    layout=HFLayout(
        "mlp", GATE_UP_DOWN, shared="shared_experts", selection_bias=True, from_file=from_file, to_file=to_file
    ),
    refuse=refuse,
    claims=lambda cfg: cfg.attention.kind == "gqa" and cfg.attention.rope_interleave,
)
