"""Parameters of a ``ModelConfig``, component by component, and the term builders other counts reuse.

Pure functions of the config; nothing is built. The counts follow the module shapes of
``moekit.layers`` (which use Hugging Face's shapes) and are cross-checked in the tests against
``MoETransformer`` and against transformers' own models, both instantiated on the meta device.

Sources: a SwiGLU FFN of width F holds ``3·d·F`` weights (Shazeer 2020, "GLU Variants");
attention ``d·H·hd + 2·d·G·hd + H·hd·d`` (GQA, Ainslie et al. 2023); MLA as in the DeepSeek-V2
paper §2.1.2 (q_a / q_b, kv_a / kv_b, o projections and two latent RMSNorms). Active parameters:
every always-on part plus ``top_k / n_routed`` of the routed experts, the DeepSeekMoE paper's
"activated parameters" (Dai et al. 2024, Table 1).
"""

from __future__ import annotations

from moekit.accounting.counts import COMPONENTS, AttentionShape, Component, Counted, ParamCount, Term
from moekit.config import AttentionConfig, ModelConfig, MoEConfig


def attention_terms(a: AttentionConfig, d: int) -> tuple[list[Term], list[Term]]:
    """One layer's attention: (weights, biases and sinks) and its internal norms."""
    h = a.n_heads
    weights: list[Term] = []
    extras: list[Term] = []  # biases and sinks: parameters, but not matmul weights
    norms: list[Term] = []
    if a.kind == "mla":
        qk, lat, rope = a.qk_nope_head_dim + a.qk_rope_head_dim, a.kv_lora_rank, a.qk_rope_head_dim
        if a.q_lora_rank is None:  # DeepSeek-V2-Lite: a plain q projection, never biased
            weights.append(Term("q", (d, h, qk)))
        else:
            weights += [Term("q_a", (d, a.q_lora_rank)), Term("q_b", (a.q_lora_rank, h, qk))]
            norms.append(Term("q_a_norm", (a.q_lora_rank,), matmul=False))
            if a.mla_bias:
                extras.append(Term("q_a bias", (a.q_lora_rank,), matmul=False))
        weights += [
            Term("kv_a", (d, lat + rope)),
            Term("kv_b", (lat, h, a.qk_nope_head_dim + a.v_head_dim)),
            Term("o", (h, a.v_head_dim, d)),
        ]
        norms.append(Term("kv_a_norm", (lat,), matmul=False))
        if a.mla_bias:
            extras += [Term("kv_a bias", (lat + rope,), matmul=False), Term("o bias", (d,), matmul=False)]
    else:
        assert a.head_dim is not None and a.n_kv_heads is not None
        hd, g = a.head_dim, a.n_kv_heads
        weights += [Term("q", (d, h, hd)), Term("k", (d, g, hd)), Term("v", (d, g, hd)), Term("o", (h, hd, d))]
        if a.qkv_bias:
            extras += [
                Term("q bias", (h, hd), matmul=False),
                Term("k bias", (g, hd), matmul=False),
                Term("v bias", (g, hd), matmul=False),
            ]
        if a.o_bias:
            extras.append(Term("o bias", (d,), matmul=False))
        if a.qk_norm == "head":  # one RMSNorm(head_dim) each for q and k, shared by heads
            norms += [Term("q_norm", (hd,), matmul=False), Term("k_norm", (hd,), matmul=False)]
        elif a.qk_norm == "full":  # RMSNorm over the whole q / k projection (OLMoE)
            norms += [Term("q_norm", (h, hd), matmul=False), Term("k_norm", (g, hd), matmul=False)]
        # "l2" (Llama 4) has no parameters.
    if a.sinks:
        extras.append(Term("sinks", (h,), matmul=False))
    return weights + extras, norms


def attention_shape(a: AttentionConfig, n_layers: int) -> AttentionShape:
    """FLOP and KV-cache widths of ``n_layers`` layers of attention ``a``."""
    if a.kind == "mla":
        kv = a.kv_lora_rank + a.qk_rope_head_dim
        return AttentionShape(
            n_layers,
            a.n_heads,
            a.qk_nope_head_dim + a.qk_rope_head_dim,
            a.v_head_dim,
            kv,
            f"({a.kv_lora_rank}+{a.qk_rope_head_dim})",
        )
    assert a.head_dim is not None and a.n_kv_heads is not None
    return AttentionShape(
        n_layers, a.n_heads, a.head_dim, a.head_dim, 2 * a.n_kv_heads * a.head_dim, f"2·{a.n_kv_heads}·{a.head_dim}"
    )


def swiglu_terms(d: int, f: int, label: str = "w1,w3,w2", n: int = 1) -> list[Term]:
    """A SwiGLU FFN (or ``n`` side by side): w1, w3 (F×d) and w2 (d×F)."""
    return [Term(label, (3, d, f) if n == 1 else (3, d, n, f))]


def expert_terms(d: int, moe: MoEConfig) -> list[Term]:
    """One routed expert: SwiGLU weights and optional biases (b1, b3: F; b2: d)."""
    f = moe.expert_ffn_dim
    biases = [Term("b1,b3", (2, f), matmul=False), Term("b2", (d,), matmul=False)] if moe.expert_bias else []
    return swiglu_terms(d, f) + biases


def router_terms(moe: MoEConfig, d: int) -> list[Term]:
    """The router of one MoE layer: a gate Linear(d, E) (+ bias), plus the learned-noise
    Linear(d, E) of noisy top-k (Shazeer et al. 2017, used in training); hash routing has no
    learned router (a fixed token-id table, a buffer)."""
    e = moe.n_routed_experts
    if moe.router == "hash":
        return []
    terms = [Term("gate", (e, d))] + ([Term("bias", (e,), matmul=False)] if moe.router_bias else [])
    if moe.router == "noisy_topk":
        terms.append(Term("noise", (e, d)))
    return terms


def model_components(cfg: ModelConfig) -> list[Component]:
    """The components of ``cfg`` in ``COMPONENTS`` order (see ``count_params``)."""
    d, v, n_layers = cfg.d_model, cfg.vocab_size, cfg.n_layers
    moe = cfg.moe
    n_moe = len(cfg.moe_layer_ids)
    n_dense = cfg.n_dense_layers
    norm_width = 2 if cfg.norm == "layernorm" else 1  # LayerNorm has a weight and a bias

    att, att_norms = attention_terms(cfg.attention, d)
    layers = f"{n_layers} layers"
    moe_layers = f"{n_moe} MoE layers"
    comps: dict[str, Component] = {
        "embedding": Component("embedding", 1, "", (Term("vocab·d", (v, d), matmul=False),)),
        "attention": Component("attention", n_layers, layers, tuple(att)),
        "norms": Component(
            "norms",
            n_layers,
            layers,
            (Term("attn_norm+ffn_norm", (2, norm_width, d), matmul=False), *att_norms),
            once=(Term("final", (norm_width, d), matmul=False),),
        ),
        "routers": Component("routers", 0, moe_layers, ()),
        "shared_experts": Component("shared_experts", 0, moe_layers, ()),
        "routed_experts": Component("routed_experts", 0, moe_layers, ()),
    }
    if moe is not None and n_moe:
        assert moe.shared_ffn_dim is not None
        e = moe.n_routed_experts
        comps["routers"] = Component("routers", n_moe, moe_layers, tuple(router_terms(moe, d)))
        shared: list[Term] = []
        if moe.n_shared_experts:
            shared += swiglu_terms(d, moe.shared_ffn_dim, n=moe.n_shared_experts)
            if moe.shared_expert_bias:  # one fused FFN: gate and up biases per unit, one down bias
                shared.append(Term("b1,b3,b2", (2 * moe.n_shared_experts * moe.shared_ffn_dim + d,), matmul=False))
            if moe.shared_expert_gate:
                shared.append(Term("gate", (d,)))
        comps["shared_experts"] = Component("shared_experts", n_moe, moe_layers, tuple(shared))
        comps["routed_experts"] = Component(
            "routed_experts",
            n_moe * e,
            f"{moe_layers} × {e} experts",
            tuple(expert_terms(d, moe)),
            active_count=n_moe * moe.top_k,
        )
    dense = swiglu_terms(d, cfg.dense_ffn_dim)
    if cfg.dense_ffn_bias:
        dense.append(Term("b1,b3,b2", (2 * cfg.dense_ffn_dim + d,), matmul=False))
    comps["dense_ffn"] = Component("dense_ffn", n_dense, f"{n_dense} dense layers", tuple(dense))
    head: list[Term] = [] if cfg.tie_embeddings else [Term("vocab·d", (v, d))]
    if cfg.lm_head_bias:
        head.append(Term("bias", (v,), matmul=False))
    comps["lm_head"] = Component("lm_head", 1, "", tuple(head))
    return [comps[name] for name in COMPONENTS]


def count_params(cfg: ModelConfig) -> ParamCount:
    """Total and active parameters of ``cfg``, by component (see ``ParamCount``).

    Active = everything a token always meets (embedding, attention, norms, routers, shared
    experts, dense FFNs, head) + top_k of the n_routed routed experts of every MoE layer. With
    expert-choice routing top_k stands for the average experts per token; capacity dropping
    (token choice with a capacity factor) can only lower the real figure.
    """
    tied = cfg.vocab_size * cfg.d_model if cfg.tie_embeddings else 0
    return ParamCount.build(model_components(cfg), tied_embeddings=cfg.tie_embeddings, tied_head_matmul=tied)


def mtp_component(cfg: ModelConfig, n_modules: int, *, in_total: bool = False) -> Component:
    """``n_modules`` multi-token-prediction modules (DeepSeek-V3 §2.2, GLM-4.5, MiniMax): each an
    ``eh_proj`` (2d → d), three RMSNorms (embedding, hidden, output) and one MoE decoder layer of
    ``cfg``; the embedding and output head are the main model's (shared), not counted again."""
    d, moe = cfg.d_model, cfg.moe
    assert moe is not None and moe.shared_ffn_dim is not None
    att, att_norms = attention_terms(cfg.attention, d)
    expert = sum(t.value for t in expert_terms(d, moe))
    shared = 3 * d * moe.n_shared_experts * moe.shared_ffn_dim + (d if moe.shared_expert_gate else 0)
    router = sum(t.value for t in router_terms(moe, d))
    terms = (
        Term("eh_proj", (2, d, d)),
        Term("enorm,hnorm,head_norm", (3, d), matmul=False),
        Term("attention", (sum(t.value for t in att),)),
        Term("layer norms", (2 * d + sum(t.value for t in att_norms),), matmul=False),
        Term("router", (router,)),
        Term("shared_experts", (shared,)),
        Term("routed_experts", (moe.n_routed_experts, expert)),
    )
    per = sum(t.value for t in terms)
    idle = (moe.n_routed_experts - moe.top_k) * expert
    matmul = (
        2 * d * d + sum(t.value for t in att if t.matmul) + router + shared + moe.top_k * 3 * d * moe.expert_ffn_dim
    )
    return Component(
        "mtp",
        n_modules,
        f"{n_modules} MTP modules",
        terms,
        active=n_modules * (per - idle),
        matmul=n_modules * matmul,
        in_total=in_total,
    )


def count_extended(
    cfg: ModelConfig,
    extra: list[Component] = (),
    *,
    replace: dict[str, Component] | None = None,
    notes: tuple[str, ...] = (),
    quantization: dict | None = None,
) -> Counted:
    """``cfg`` counted with ``extra`` components (after ``attention``, or before ``lm_head``
    for those named ``mtp``) and some of its own ``replace`` d: what a type moekit cannot
    build adds to the nearest ``ModelConfig`` (Arctic's residual MLP, DeepSeek-V3.2's indexer)."""
    comps = [(replace or {}).get(c.name, c) for c in model_components(cfg)]
    at = [c.name for c in comps].index("attention") + 1
    for c in extra:
        if c.name == "mtp":
            comps.append(c)
        else:
            comps.insert(at, c)
            at += 1
    tied = cfg.vocab_size * cfg.d_model if cfg.tie_embeddings else 0
    p = ParamCount.build(comps, tied_embeddings=cfg.tie_embeddings, tied_head_matmul=tied, notes=notes)
    return Counted(
        name=cfg.name,
        params=p,
        attention=(attention_shape(cfg.attention, cfg.n_layers),),
        max_seq_len=cfg.max_seq_len,
        quantization=quantization,
    )
