"""Ling / Bailing MoE (``bailing_moe``, inclusionAI remote code): fused ``query_key_value`` (biased
with ``use_qkv_bias``) and ``dense`` output projection (``use_bias``), the first
``first_k_dense_replace`` layers dense, then ``num_experts`` routed experts (top
``num_experts_per_tok``) of ``moe_intermediate_size`` beside ``num_shared_experts`` shared ones.
Source: inclusionAI's ``modeling_bailing_moe.py`` (Ling-lite: 16.8B total, 2.75B active)."""

from __future__ import annotations

from moekit.accounting import Counted, count_extended
from moekit.interop.types._base import ModelType
from moekit.interop.types._reader import MISSING, Reader
from moekit.interop.types._shared_moe import shared_moe_config


def account(r: Reader) -> Counted:
    cfg = shared_moe_config(
        r,
        n_experts=r.int("num_experts", MISSING, "num_local_experts"),
        top_k=r.int("num_experts_per_tok"),
        expert_width=r.int("moe_intermediate_size"),
        n_shared=r.int("num_shared_experts", 0),
        first_dense=r.int("first_k_dense_replace", 0),
        qkv_bias=r.bool("use_qkv_bias", False),
        o_bias=r.bool("use_bias", False),
    )
    return count_extended(cfg)


BAILING_MOE = ModelType("bailing_moe", account=account)
