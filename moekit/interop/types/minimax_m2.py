"""MiniMax-M2 (``minimax_m2``): GQA with RMSNorms over the whole q and k projections, every layer a
top-k MoE with sigmoid scores and a selection bias, no shared expert. Its partial rotary
(``rotary_dim``) changes no shapes. Its multi-token-prediction modules (``num_mtp_modules``) are
not in transformers' model nor in the published total; moekit does not count them."""

from __future__ import annotations

from moekit.config import ModelConfig
from moekit.interop.types._base import ModelType
from moekit.interop.types._reader import MISSING, Reader, common, make


def read(r: Reader) -> ModelConfig:
    base = common(r)
    if base["attention"]["head_dim"] is None:
        base["attention"]["head_dim"] = base["d_model"] // base["attention"]["n_heads"]
    base["attention"]["qk_norm"] = "full" if r.bool("use_qk_norm", True) else "none"
    moe = dict(
        n_routed_experts=r.int("num_local_experts", MISSING, "num_experts"),
        top_k=r.int("num_experts_per_tok"),
        expert_ffn_dim=r.int("intermediate_size"),
        score_func="sigmoid",
        norm_topk_prob=True,
        selection_bias=True,
    )
    return make(r, base, dense_ffn_dim=r.int("intermediate_size"), moe=moe, moe_ids=list(range(base["n_layers"])))


MINIMAX_M2 = ModelType("minimax_m2", read=read)
