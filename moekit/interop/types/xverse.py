"""XVERSE-MoE (``xverse``, remote code): LLaMA attention, every layer an MoE of ``num_experts``
fine-grained experts (``intermediate_size`` wide, top ``moe_top_k``) beside
``num_shared_experts`` shared experts of the same width. Dense XVERSE configs (no
``num_experts``) read as LLaMA. Source: XVERSE's ``modeling_xverse.py`` (XVERSE-MoE-A4.2B: 25.8B
total, 4.2B active)."""

from __future__ import annotations

from moekit.accounting import Counted, count_extended
from moekit.interop.types._base import ModelType
from moekit.interop.types._reader import Reader, constant
from moekit.interop.types._shared_moe import shared_moe_config


def account(r: Reader) -> Counted:
    e = constant(r, "num_experts", 0, "num_local_experts")
    cfg = shared_moe_config(
        r,
        n_experts=max(e, 1),
        top_k=constant(r, "moe_top_k", 1, "num_experts_per_tok"),
        expert_width=r.int("moe_intermediate_size", r.int("intermediate_size")),
        n_shared=r.int("num_shared_experts", 0),
        first_dense=0 if e > 1 else r.int("num_hidden_layers"),
        qkv_bias=False,
        o_bias=False,
    )
    return count_extended(cfg)


XVERSE = ModelType("xverse", account=account)
