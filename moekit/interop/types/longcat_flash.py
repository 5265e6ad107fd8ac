"""LongCat-Flash (``longcat_flash``, Meituan): ``num_layers`` shortcut-connected blocks, each with two
MLA attention sublayers, two dense SwiGLU MLPs (``ffn_hidden_size``) and one MoE whose router
also chooses among ``zero_expert_num`` zero-computation experts (the token passes through).

So the routed experts a token uses vary: of its top-k picks among E real + Z zero experts,
between max(0, k − Z) and min(k, E) are real. ``active`` is the figure under uniform routing
(k · E / (E + Z) real experts a layer), ``active_range`` its bounds.

transformers 5.24 allocates the fused ``gate_up_proj`` for all E + Z experts (``down_proj`` for
the E real ones); the published checkpoints hold E, and so does this count (the difference is
Z · 2F · d a layer). Source: transformers' ``modeling_longcat_flash.py``; LongCat-Flash report.
"""

from __future__ import annotations

from moekit.accounting import Component, Counted, ParamCount, Term
from moekit.accounting.params import attention_shape, attention_terms
from moekit.config import AttentionConfig
from moekit.interop.types._base import ModelType
from moekit.interop.types._reader import Reader, rope


def account(r: Reader) -> Counted:
    v, d, n = r.int("vocab_size"), r.int("hidden_size"), r.int("num_layers")
    att = AttentionConfig(
        n_heads=r.int("num_attention_heads"),
        kind="mla",
        q_lora_rank=r.int("q_lora_rank"),
        kv_lora_rank=r.int("kv_lora_rank"),
        qk_nope_head_dim=r.int("qk_nope_head_dim"),
        qk_rope_head_dim=r.int("qk_rope_head_dim"),
        v_head_dim=r.int("v_head_dim"),
        mla_bias=r.bool("attention_bias", False),
        **rope(r),
    )
    att.validate(d)
    e, z = r.int("n_routed_experts"), r.int("zero_expert_num", 0)
    k = r.int("moe_topk", None, "num_experts_per_tok")
    f, ffn = r.int("expert_ffn_hidden_size"), r.int("ffn_hidden_size")
    tied = r.bool("tie_word_embeddings", False)
    weights, att_norms = attention_terms(att, d)
    expert = 3 * d * f
    uniform = n * k * e * expert // (e + z)
    lo, hi = n * max(0, k - z) * expert, n * min(k, e) * expert
    comps = [
        Component("embedding", 1, "", (Term("vocab·d", (v, d), matmul=False),)),
        Component("attention", 2 * n, f"{n} layers × 2 MLA sublayers", tuple(weights)),
        Component(
            "norms",
            2 * n,
            f"{2 * n} sublayers",
            (Term("attn_norm+ffn_norm", (2, d), matmul=False), *att_norms),
            once=(Term("final", (d,), matmul=False),),
        ),
        Component("routers", n, f"{n} MoE layers", (Term("gate (real + zero experts)", (e + z, d)),)),
        Component("shared_experts", 0, "", ()),
        Component(
            "routed_experts",
            n * e,
            f"{n} MoE layers × {e} experts",
            (Term("w1,w3,w2", (3, d, f)),),
            active=uniform,
            matmul=uniform,
        ),
        Component("dense_ffn", 2 * n, f"{n} layers × 2 MLPs", (Term("w1,w3,w2", (3, d, ffn)),)),
        Component("lm_head", 1, "", () if tied else (Term("vocab·d", (v, d)),)),
    ]
    p = ParamCount.build(
        comps,
        tied_embeddings=tied,
        tied_head_matmul=v * d if tied else 0,
        notes=(f"{z} zero-computation experts beside {e}: active assumes uniform routing over all {e + z}",),
    )
    rest = p.active - uniform
    p = ParamCount.build(
        comps,
        tied_embeddings=tied,
        tied_head_matmul=v * d if tied else 0,
        active_range=(rest + lo, rest + hi),
        notes=p.notes,
    )
    name = str(r.d.get("_name_or_path") or "longcat_flash")
    return Counted(name, p, (attention_shape(att, 2 * n),), r.int("max_position_embeddings", 4096))


LONGCAT_FLASH = ModelType("longcat_flash", account=account)
