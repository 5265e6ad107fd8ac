"""JetMoE (``jetmoe``): its attention is a mixture too. Each layer has a mixture-of-attention (MoA)
block, top-k of E query/output experts (``[E, G·kv, d]`` in, ``[E, d, G·kv]`` out) over one
shared k/v projection (d → 2·G·kv), and a MoE FFN of E gated experts (``[E, 2F, d]`` in,
``[E, d, F]`` out); both blocks have their own router (d → E, no bias) and an output bias (d).
The heads a token uses are G·top_k (``num_attention_heads`` is derived). Source: transformers'
``modeling_jetmoe.py``."""

from __future__ import annotations

from moekit.accounting import AttentionShape, Component, Counted, ParamCount, Term
from moekit.interop.types._base import ModelType
from moekit.interop.types._reader import MISSING, Reader


def account(r: Reader) -> Counted:
    v, d, n = r.int("vocab_size"), r.int("hidden_size"), r.int("num_hidden_layers")
    e, k = r.int("num_local_experts", MISSING, "num_experts"), r.int("num_experts_per_tok")
    g, kv = r.int("num_key_value_heads"), r.int("kv_channels", MISSING, "head_dim")
    f = r.int("intermediate_size")
    tied = r.bool("tie_word_embeddings", True)
    comps = [
        Component("embedding", 1, "", (Term("vocab·d", (v, d), matmul=False),)),
        Component("attention", n, f"{n} layers", (Term("kv_proj", (d, 2, g, kv)), Term("MoA output bias", (d,), matmul=False))),
        Component("attention_experts", n * e, f"{n} layers × {e} attention experts", (Term("q,o", (2, d, g, kv)),), active_count=n * k),
        Component("norms", n, f"{n} layers", (Term("attn_norm+ffn_norm", (2, d), matmul=False),), once=(Term("final", (d,), matmul=False),)),
        Component("routers", n, f"{n} layers", (Term("MoA gate, MoE gate", (2, e, d)),)),
        Component("shared_experts", 0, "", ()),
        Component("routed_experts", n * e, f"{n} MoE layers × {e} experts", (Term("w1,w3,w2", (3, d, f)),), active_count=n * k),
        Component("moe_bias", n, f"{n} layers", (Term("MoE output bias", (d,), matmul=False),)),
        Component("dense_ffn", 0, "", ()),
        Component("lm_head", 1, "", () if tied else (Term("vocab·d", (v, d)),)),
    ]  # fmt: skip
    p = ParamCount.build(comps, tied_embeddings=tied, tied_head_matmul=v * d if tied else 0)
    shape = AttentionShape(n, g * k, kv, kv, 2 * g * kv, f"2·{g}·{kv}")
    return Counted(str(r.d.get("_name_or_path") or "jetmoe"), p, (shape,), r.int("max_position_embeddings", 4096))


JETMOE = ModelType("jetmoe", account=account)
