"""Grok-1 (xAI) ports for PyTorch: configs with no ``model_type``, recognised by ``architectures``
(``Grok1ModelForCausalLM``). GQA without biases, four RMSNorms per layer (before and after both
attention and the MoE), every layer a top-2 MoE of 8 gated experts, tied embeddings. Its
attention and logit multipliers and soft-capping change behaviour, not shapes.

Source: the HPC-AI Tech / keyfan ports' ``modeling_grok1.py`` (314B parameters, xAI's release).
"""

from __future__ import annotations

from moekit.accounting import Component, Counted, Term, count_extended
from moekit.interop.types._base import ModelType
from moekit.interop.types._reader import MISSING, Reader, common, make


def account(r: Reader) -> Counted:
    base = common(r)
    if base["attention"]["head_dim"] is None:
        base["attention"]["head_dim"] = base["d_model"] // base["attention"]["n_heads"]
    base["tie_embeddings"] = r.bool("tie_word_embeddings", True)
    moe = dict(
        n_routed_experts=r.int("num_experts", MISSING, "num_local_experts"),
        top_k=r.int("num_experts_per_tok", 2),
        expert_ffn_dim=r.int("intermediate_size"),
    )
    cfg = make(r, base, dense_ffn_dim=r.int("intermediate_size"), moe=moe, moe_ids=list(range(base["n_layers"])))
    d, n = cfg.d_model, cfg.n_layers
    norms = Component(
        "norms", n, f"{n} layers", (Term("4 norms", (4, d), matmul=False),), once=(Term("final", (d,), matmul=False),)
    )
    return count_extended(cfg, replace={"norms": norms})


GROK1 = ModelType("grok-1", account=account, architectures=("Grok1ModelForCausalLM", "Grok1ForCausalLM"))
