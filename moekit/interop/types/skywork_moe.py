"""Skywork-MoE (``skywork_moe``; some ports say ``skywork``, remote code): Mixtral's layout (every
layer a MoE of ``num_experts`` SwiGLU experts, no shared expert) with top-2 routing: its config
carries no top-k key because its modelling code hard-codes 2 (read when a port adds one).
Source: Skywork's ``modeling_skywork_moe.py`` (Skywork-MoE: 146B total, 22B active)."""

from __future__ import annotations

from moekit.accounting import Counted, count_extended
from moekit.interop.types._base import ModelType
from moekit.interop.types._reader import Reader, constant
from moekit.interop.types._shared_moe import shared_moe_config

TOP_K = 2  # modeling_skywork_moe.py: the router keeps the top 2, whatever the config says


def account(r: Reader) -> Counted:
    cfg = shared_moe_config(
        r,
        n_experts=constant(r, "num_experts", None, "num_local_experts"),
        top_k=constant(r, "num_experts_per_tok", TOP_K, "moe_topk"),
        expert_width=r.int("moe_intermediate_size", r.int("intermediate_size")),
        n_shared=0,
        first_dense=0,
        qkv_bias=False,
        o_bias=False,
    )
    return count_extended(cfg, notes=("top-2: hard-coded in Skywork's modelling code",))


SKYWORK_MOE = ModelType("skywork_moe", account=account)
SKYWORK = ModelType("skywork", account=account)
