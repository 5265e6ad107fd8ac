"""DBRX (``dbrx``, Databricks): the config nests attention and FFN settings (``attn_config``,
``ffn_config``); every layer a top-k MoE of SwiGLU experts, fused ``Wqkv`` without biases,
bias-free LayerNorms (one weight of d each, as an RMSNorm counts). Counted natively (moekit's
LayerNorm has a bias, so it does not build DBRX); ``clip_qkv`` changes behaviour, not shapes.
Source: transformers' ``modeling_dbrx.py``."""

from __future__ import annotations

from typing import Any

from moekit.accounting import Counted, count_extended
from moekit.config import AttentionConfig, ConfigError, ModelConfig, MoEConfig
from moekit.interop.types._base import ModelType
from moekit.interop.types._reader import Reader, rope


def account(r: Reader) -> Counted:
    attn, ffn = r.get("attn_config", {}), r.get("ffn_config")
    if not isinstance(attn, dict) or not isinstance(ffn, dict):
        raise ConfigError(f"{r.where}: 'attn_config' and 'ffn_config' must be objects")
    a, f = Reader(attn, f"{r.where} attn_config"), Reader(ffn, f"{r.where} ffn_config")
    d, h = r.int("d_model"), r.int("n_heads")
    rope_kw: dict[str, Any] = rope(Reader({"rope_theta": a.get("rope_theta", 10000.0)}, r.where))
    cfg = ModelConfig(
        vocab_size=r.int("vocab_size"),
        d_model=d,
        n_layers=r.int("n_layers"),
        max_seq_len=r.int("max_seq_len", 2048),
        tie_embeddings=r.bool("tie_word_embeddings", False),
        attention=AttentionConfig(n_heads=h, n_kv_heads=a.int("kv_n_heads", 1), **rope_kw),
        dense_ffn_dim=f.int("ffn_hidden_size"),
        moe=MoEConfig(
            n_routed_experts=f.int("moe_num_experts"),
            top_k=f.int("moe_top_k"),
            expert_ffn_dim=f.int("ffn_hidden_size"),
        ),
        name=str(r.d.get("_name_or_path") or "dbrx"),
    )
    return count_extended(cfg, notes=("norms are bias-free LayerNorms",))


DBRX = ModelType("dbrx", account=account)
