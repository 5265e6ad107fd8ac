"""The layout several remote-code MoE models share (Ling/Bailing, XVERSE-MoE, Skywork-MoE): LLaMA
attention, dense layers first, then MoE layers of routed SwiGLU experts beside always-on shared
ones. Each type's record reads its own key names into ``shared_moe_config``."""

from __future__ import annotations

from moekit.config import ModelConfig
from moekit.interop.types._reader import Reader, common, make


def shared_moe_config(
    r: Reader,
    *,
    n_experts: int,
    top_k: int,
    expert_width: int,
    n_shared: int,
    first_dense: int,
    qkv_bias: bool,
    o_bias: bool,
) -> ModelConfig:
    base = common(r)
    if base["attention"]["head_dim"] is None:
        base["attention"]["head_dim"] = base["d_model"] // base["attention"]["n_heads"]
    base["attention"].update(qkv_bias=qkv_bias, o_bias=o_bias)
    moe = dict(
        n_routed_experts=n_experts,
        top_k=top_k,
        expert_ffn_dim=expert_width,
        n_shared_experts=1 if n_shared else 0,
        shared_ffn_dim=n_shared * expert_width if n_shared else None,
    )
    ids = list(range(first_dense, base["n_layers"]))
    return make(r, base, dense_ffn_dim=r.int("intermediate_size"), moe=moe if ids else None, moe_ids=ids)
