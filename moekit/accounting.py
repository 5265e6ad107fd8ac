"""Analytic accounting of a ``ModelConfig``: total/active parameters, FLOPs and memory.

Pure functions of the config; nothing is built. The counts follow the module shapes of
``moekit.layers`` (which use Hugging Face's shapes) and are cross-checked in the tests against
``MoETransformer`` and against transformers' own models, both instantiated on the meta device.

Sources for the formulas:

- Parameters: a SwiGLU FFN of width F holds ``3·d·F`` weights (Shazeer 2020, "GLU Variants");
  attention ``d·H·hd + 2·d·G·hd + H·hd·d`` (GQA, Ainslie et al. 2023); MLA as in the
  DeepSeek-V2 paper §2.1.2 (q_a / q_b, kv_a / kv_b, o projections and two latent RMSNorms).
- Active parameters: every always-on part plus ``top_k / n_routed`` of the routed experts,
  the DeepSeekMoE paper's "activated parameters" (Dai et al. 2024, Table 1).
- FLOPs: forward = 2 × (matmul weights a token meets) + attention scores and values
  (Kaplan et al. 2020, Table 1: ``2N + 2·n_layer·n_ctx·d_attn``); training = 3 × forward
  (backward is twice the forward). The attention term uses the *full* context by default, as
  Kaplan, Chinchilla (Hoffmann et al. 2022, App. F) and DeepSeek LLM (2024, §3.1:
  ``M = 72·n_layer·d² + 12·n_layer·d·l_seq``) do; ``causal=True`` uses the mean causal
  context ``(S + 1) / 2`` instead.
- Memory: weights = total parameters × bytes per parameter; the KV cache per token holds K and V
  (``2·G·hd`` values) per layer, or for MLA the compressed latent plus the shared rotary key
  (``kv_lora_rank + qk_rope_head_dim``, DeepSeek-V2 paper Table 1).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from moekit.config import ConfigError, ModelConfig, MoEConfig

# Bytes per stored value, for weights and KV cache.
DTYPE_BYTES: dict[str, int] = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1}
WEIGHT_DTYPES = ("fp32", "bf16", "fp8")

# Components that add up to the total, in display order.
COMPONENTS = ("embedding", "attention", "norms", "routers", "shared_experts", "routed_experts", "dense_ffn", "lm_head")

ActiveConvention = Literal["all", "no_input_embedding", "non_embedding"]

# How each vendor counts the "active parameters" it publishes, found by comparing our analytic
# counts with the published figures (tests/test_accounting.py::test_published_active_counts):
#   "all"                 every parameter a token touches, input embedding and output head included
#   "no_input_embedding"  the input embedding left out, the output head (unembedding) counted
#   "non_embedding"       both embedding matrices left out (Kaplan et al.'s N)
VENDOR_ACTIVE_CONVENTION: dict[str, ActiveConvention] = {
    # Mixtral 8x7B "12.9B active": 12.88B with both embedding matrices, 12.75B without the input
    # embedding. (8x22B "39B": 39.15B / 38.96B, either.)
    "mistral": "all",
    # DeepSeekMoE 16B "2.8B": 2.83B with both, 2.62B without the input embedding.
    "deepseek-moe": "all",
    # DeepSeek-V3 "37B": 37.55B with both, 36.63B without the input embedding. DeepSeek-V2 "21B":
    # 21.38B / 20.85B (either). V2-Lite "2.4B": 2.66B / 2.45B; the published 2.4 is 2.45 cut, not
    # rounded (or the routers left out: 2.448B).
    "deepseek-v2": "no_input_embedding",
    "deepseek-v3": "no_input_embedding",
    # Qwen1.5-MoE-A2.7B "2.7B": 2.69B with both (2.38B without the input embedding).
    # Qwen3-30B-A3B "3.3B": 3.353B with both, again cut rather than rounded (3.340B without routers).
    "qwen": "all",
    # OLMoE-1B-7B "1.3B active": 1.28B with both, 1.18B without the input embedding.
    "olmoe": "all",
    # gpt-oss model card (Table 1) "active": 20b 3.61B, 120b 5.13B; ours without the input
    # embedding 3.608B and 5.133B (4.19B / 5.71B with it): the unembedding counts, the embedding not.
    "openai": "no_input_embedding",
    # Phi-3.5-MoE "6.6B active": 6.64B with both, 6.51B without the input embedding.
    "microsoft": "all",
    # Llama 4 Scout and Maverick "17B active": 17.17B / 17.18B with both, 16.14B / 16.15B without.
    "meta": "all",
}


@dataclass(frozen=True)
class _Term:
    """One summand of a component: a label and the numbers it multiplies, e.g. ``q 4096·4096``."""

    label: str
    factors: tuple[int, ...]

    @property
    def value(self) -> int:
        v = 1
        for f in self.factors:
            v *= f
        return v

    def text(self) -> str:
        return f"{self.label} " + "·".join(str(f) for f in self.factors)


@dataclass(frozen=True)
class _Component:
    """``count × (sum of terms) + (sum of once)``: e.g. the attention of every layer."""

    name: str
    count: int  # how many times the bracket repeats (layers, experts, or 1)
    count_text: str  # how the count reads: "32 layers", "27 MoE layers × 64 experts", or ""
    terms: tuple[_Term, ...]
    once: tuple[_Term, ...] = ()  # added once, outside the bracket (the final norm)

    @property
    def value(self) -> int:
        return self.count * sum(t.value for t in self.terms) + sum(t.value for t in self.once)

    def text(self) -> str:
        body = " + ".join(t.text() for t in self.terms) or "0"
        text = f"{self.count_text} × ({body})" if self.count_text else body
        if self.once:
            text += " + " + " + ".join(t.text() for t in self.once)
        return f"{text} = {self.value:,}"


@dataclass(frozen=True)
class ParamCount:
    """Parameters by component.

    ``breakdown`` holds the components of ``COMPONENTS`` (they sum to ``total``) plus
    ``routed_experts_active`` (the routed-expert parameters one token uses, not a summand of the
    total). With tied embeddings ``lm_head`` is 0 (the matrix is counted once, as ``embedding``)
    apart from an lm_head bias. ``active_breakdown`` holds the active part of each component.
    """

    total: int
    active: int
    breakdown: dict[str, int]
    active_breakdown: dict[str, int]
    # Weights a token multiplies (FLOPs base): the active parameters without the embedding lookup,
    # norms, biases and sinks, with the output head (V·d, tied or not).
    matmul_active: int
    tied_embeddings: bool
    components: tuple[_Component, ...] = field(repr=False, default=())

    def active_by(self, convention: ActiveConvention) -> int:
        """Active parameters under a vendor convention (see ``VENDOR_ACTIVE_CONVENTION``)."""
        emb, head = self.breakdown["embedding"], self.breakdown["lm_head"]
        if convention == "all":
            return self.active
        if convention == "no_input_embedding":
            # Tied: the shared matrix is still used as the output head, so it stays counted.
            return self.active - (0 if self.tied_embeddings else emb)
        if convention == "non_embedding":
            return self.active - emb - head
        raise ConfigError(
            f"unknown active-parameter convention {convention!r}; known: all, no_input_embedding, non_embedding"
        )


@dataclass(frozen=True)
class FlopCount:
    """FLOPs at sequence length ``seq_len`` (multiply-add = 2 FLOPs)."""

    seq_len: int
    causal: bool  # attention context: mean causal (S+1)/2 if True, full S if False
    matmul_per_token: int  # 2 × ParamCount.matmul_active
    attention_per_token: int  # q·k scores and probs·v over the context, all layers
    forward_per_token: int
    train_per_token: int  # 3 × forward (forward + backward)
    train_per_sequence: int  # train_per_token × seq_len: the DeepSeekMoE "FLOPs per 4K tokens"


@dataclass(frozen=True)
class Report:
    """Everything ``moekit params`` shows."""

    name: str
    params: ParamCount
    flops: FlopCount
    weights_bytes: dict[str, int]  # total parameters × bytes, by dtype
    kv_cache_dtype: str
    kv_cache_bytes_per_token: int
    formula: str

    def to_dict(self) -> dict:
        """A JSON-ready dict (the ``moekit params --json`` schema)."""
        p, f = self.params, self.flops
        return {
            "name": self.name,
            "total": p.total,
            "active": p.active,
            "breakdown": dict(p.breakdown),
            "active_breakdown": dict(p.active_breakdown),
            "tied_embeddings": p.tied_embeddings,
            "active_conventions": {c: p.active_by(c) for c in ("all", "no_input_embedding", "non_embedding")},
            "matmul_active": p.matmul_active,
            "flops_per_token": f.forward_per_token,
            "flops": {
                "seq_len": f.seq_len,
                "attention_context": "causal" if f.causal else "full",
                "matmul_per_token": f.matmul_per_token,
                "attention_per_token": f.attention_per_token,
                "forward_per_token": f.forward_per_token,
                "train_per_token": f.train_per_token,
                "train_per_sequence": f.train_per_sequence,
            },
            "weights_bytes": dict(self.weights_bytes),
            "kv_cache_dtype": self.kv_cache_dtype,
            "kv_cache_bytes_per_token": self.kv_cache_bytes_per_token,
            "formula": self.formula,
        }


# Parameters ---------------------------------------------------------------------------------


def _attention_terms(cfg: ModelConfig) -> tuple[list[_Term], list[_Term], list[_Term]]:
    """Per-layer attention (weights, biases and sinks) and attention-internal norms."""
    a, d = cfg.attention, cfg.d_model
    h = a.n_heads
    weights: list[_Term] = []
    extras: list[_Term] = []  # biases and sinks: parameters, but not matmul weights
    norms: list[_Term] = []
    if a.kind == "mla":
        qk, lat, rope = a.qk_nope_head_dim + a.qk_rope_head_dim, a.kv_lora_rank, a.qk_rope_head_dim
        if a.q_lora_rank is None:  # DeepSeek-V2-Lite: a plain q projection, never biased
            weights.append(_Term("q", (d, h, qk)))
        else:
            weights += [_Term("q_a", (d, a.q_lora_rank)), _Term("q_b", (a.q_lora_rank, h, qk))]
            norms.append(_Term("q_a_norm", (a.q_lora_rank,)))
            if a.mla_bias:
                extras.append(_Term("q_a bias", (a.q_lora_rank,)))
        weights += [
            _Term("kv_a", (d, lat + rope)),
            _Term("kv_b", (lat, h, a.qk_nope_head_dim + a.v_head_dim)),
            _Term("o", (h, a.v_head_dim, d)),
        ]
        norms.append(_Term("kv_a_norm", (lat,)))
        if a.mla_bias:
            extras += [_Term("kv_a bias", (lat + rope,)), _Term("o bias", (d,))]
    else:
        assert a.head_dim is not None and a.n_kv_heads is not None
        hd, g = a.head_dim, a.n_kv_heads
        weights += [_Term("q", (d, h, hd)), _Term("k", (d, g, hd)), _Term("v", (d, g, hd)), _Term("o", (h, hd, d))]
        if a.qkv_bias:
            extras += [_Term("q bias", (h, hd)), _Term("k bias", (g, hd)), _Term("v bias", (g, hd))]
        if a.o_bias:
            extras.append(_Term("o bias", (d,)))
        if a.qk_norm == "head":  # one RMSNorm(head_dim) each for q and k, shared by heads
            norms += [_Term("q_norm", (hd,)), _Term("k_norm", (hd,))]
        elif a.qk_norm == "full":  # RMSNorm over the whole q / k projection (OLMoE)
            norms += [_Term("q_norm", (h, hd)), _Term("k_norm", (g, hd))]
        # "l2" (Llama 4) has no parameters.
    if a.sinks:
        extras.append(_Term("sinks", (h,)))
    return weights, extras, norms


def _expert_terms(cfg: ModelConfig) -> tuple[list[_Term], list[_Term]]:
    """One routed expert: SwiGLU weights (w1, w3: F×d, w2: d×F) and optional biases."""
    assert cfg.moe is not None
    d, f = cfg.d_model, cfg.moe.expert_ffn_dim
    weights = [_Term("w1,w3,w2", (3, d, f))]
    biases = [_Term("b1,b3", (2, f)), _Term("b2", (d,))] if cfg.moe.expert_bias else []
    return weights, biases


def _router_terms(moe: MoEConfig, d: int) -> list[_Term]:
    """The router of one MoE layer: a gate Linear(d, E) (+ bias), plus the learned-noise
    Linear(d, E) of noisy top-k (Shazeer et al. 2017, used in training); hash routing has no
    learned router (a fixed token-id table, a buffer)."""
    e = moe.n_routed_experts
    if moe.router == "hash":
        return []
    terms = [_Term("gate", (e, d))] + ([_Term("bias", (e,))] if moe.router_bias else [])
    if moe.router == "noisy_topk":
        terms.append(_Term("noise", (e, d)))
    return terms


def count_params(cfg: ModelConfig) -> ParamCount:
    """Total and active parameters of ``cfg``, by component (see ``ParamCount``).

    Active = everything a token always meets (embedding, attention, norms, routers, shared
    experts, dense FFNs, head) + top_k of the n_routed routed experts of every MoE layer. With
    expert-choice routing top_k stands for the average experts per token; capacity dropping
    (token choice with a capacity factor) can only lower the real figure.
    """
    d, v, n_layers = cfg.d_model, cfg.vocab_size, cfg.n_layers
    moe = cfg.moe
    n_moe = len(cfg.moe_layer_ids)
    n_dense = cfg.n_dense_layers
    norm_width = 2 if cfg.norm == "layernorm" else 1  # LayerNorm has a weight and a bias

    att_w, att_x, att_norms = _attention_terms(cfg)
    layers = f"{n_layers} layers"
    moe_layers = f"{n_moe} MoE layers"
    comps: dict[str, _Component] = {
        "embedding": _Component("embedding", 1, "", (_Term("vocab·d", (v, d)),)),
        "attention": _Component("attention", n_layers, layers, tuple(att_w + att_x)),
        "norms": _Component(
            "norms",
            n_layers,
            layers,
            (_Term("attn_norm+ffn_norm", (2, norm_width, d)), *att_norms),
            once=(_Term("final", (norm_width, d)),),
        ),
        "routers": _Component("routers", 0, moe_layers, ()),
        "shared_experts": _Component("shared_experts", 0, moe_layers, ()),
        "routed_experts": _Component("routed_experts", 0, moe_layers, ()),
    }
    routed_active_count = 0
    if moe is not None and n_moe:
        assert moe.shared_ffn_dim is not None
        e = moe.n_routed_experts
        comps["routers"] = _Component("routers", n_moe, moe_layers, tuple(_router_terms(moe, d)))
        shared: list[_Term] = []
        if moe.n_shared_experts:
            shared.append(_Term("w1,w3,w2", (3, d, moe.n_shared_experts, moe.shared_ffn_dim)))
            if moe.shared_expert_gate:
                shared.append(_Term("gate", (d,)))
        comps["shared_experts"] = _Component("shared_experts", n_moe, moe_layers, tuple(shared))
        ew, eb = _expert_terms(cfg)
        comps["routed_experts"] = _Component("routed_experts", n_moe * e, f"{moe_layers} × {e} experts", tuple(ew + eb))
        routed_active_count = n_moe * moe.top_k
    comps["dense_ffn"] = _Component(
        "dense_ffn", n_dense, f"{n_dense} dense layers", (_Term("w1,w3,w2", (3, d, cfg.dense_ffn_dim)),)
    )
    head: list[_Term] = [] if cfg.tie_embeddings else [_Term("vocab·d", (v, d))]
    if cfg.lm_head_bias:
        head.append(_Term("bias", (v,)))
    comps["lm_head"] = _Component("lm_head", 1, "", tuple(head))

    breakdown = {name: comps[name].value for name in COMPONENTS}
    total = sum(breakdown.values())
    per_expert = sum(t.value for t in comps["routed_experts"].terms)
    routed_active = routed_active_count * per_expert
    breakdown["routed_experts_active"] = routed_active
    active_breakdown = {name: breakdown[name] for name in COMPONENTS}
    active_breakdown["routed_experts"] = routed_active
    active = sum(active_breakdown.values())

    matmul = n_layers * sum(t.value for t in att_w) + v * d + n_dense * 3 * d * cfg.dense_ffn_dim
    if moe is not None and n_moe:
        assert moe.shared_ffn_dim is not None
        matmul += n_moe * sum(t.value for t in _router_terms(moe, d) if t.label != "bias")
        matmul += n_moe * 3 * d * moe.n_shared_experts * moe.shared_ffn_dim
        matmul += n_moe * d * int(moe.shared_expert_gate)
        matmul += routed_active_count * 3 * d * moe.expert_ffn_dim
    return ParamCount(
        total=total,
        active=active,
        breakdown=breakdown,
        active_breakdown=active_breakdown,
        matmul_active=matmul,
        tied_embeddings=cfg.tie_embeddings,
        components=tuple(comps[name] for name in COMPONENTS),
    )


# FLOPs and memory ---------------------------------------------------------------------------


def _attention_widths(cfg: ModelConfig) -> tuple[int, int]:
    """(query/key width, value width) per head."""
    a = cfg.attention
    if a.kind == "mla":
        return a.qk_nope_head_dim + a.qk_rope_head_dim, a.v_head_dim
    assert a.head_dim is not None
    return a.head_dim, a.head_dim


def count_flops(cfg: ModelConfig, seq_len: int = 4096, *, causal: bool = False) -> FlopCount:
    """Forward and training FLOPs per token at context ``seq_len``.

    forward/token = 2·N_matmul + attention, with N_matmul = ``ParamCount.matmul_active``
    (embedding lookup excluded, output head and routers included) and
    attention = 2·L·H·(d_qk + d_v)·S (full context) or L·H·(d_qk + d_v)·(S + 1) (causal mean).
    Sliding-window or chunked attention is not modelled (the full context is charged).

    ``train_per_sequence`` (= 3 × forward × S) is the convention of the DeepSeekMoE paper's
    "FLOPs per 4K tokens" (6·N + 12·L·d·S per token, DeepSeek LLM §3.1). Checked in the tests:
    DeepSeekMoE 145B: 586.3T here vs 585.6T published (0.1%, the paper seemingly omits the
    router); 2B: 4.33T per 2K tokens vs 4.3T. The 16B gives 75.9T vs 74.4T published: the paper
    computed it from nominal sizes (each expert 0.25 of an 8·d² FFN, every layer MoE: 120·L·d²
    + 12·L·d·S + 6·V·d = 74.42T), while the released model's experts are 1408 wide (2.06·d²).
    """
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ConfigError(f"seq_len must be a positive integer, got {seq_len!r}")
    p = count_params(cfg)
    dqk, dv = _attention_widths(cfg)
    per_layer = cfg.attention.n_heads * (dqk + dv)
    if causal:
        attention = cfg.n_layers * per_layer * (seq_len + 1)  # 2·per_layer·(S+1)/2, exact
    else:
        attention = 2 * cfg.n_layers * per_layer * seq_len
    matmul = 2 * p.matmul_active
    forward = matmul + attention
    return FlopCount(
        seq_len=seq_len,
        causal=causal,
        matmul_per_token=matmul,
        attention_per_token=attention,
        forward_per_token=forward,
        train_per_token=3 * forward,
        train_per_sequence=3 * forward * seq_len,
    )


def _dtype_bytes(dtype: str) -> int:
    if dtype not in DTYPE_BYTES:
        raise ConfigError(f"unknown dtype {dtype!r}; known: {', '.join(DTYPE_BYTES)}")
    return DTYPE_BYTES[dtype]


def weights_bytes(cfg: ModelConfig, dtypes: tuple[str, ...] = WEIGHT_DTYPES) -> dict[str, int]:
    """Weight memory (total parameters × bytes per parameter) for each dtype."""
    total = count_params(cfg).total
    return {dt: total * _dtype_bytes(dt) for dt in dtypes}


def kv_cache_values_per_token(cfg: ModelConfig) -> int:
    """Cached values per token over all layers: 2·G·hd per layer (K and V), or for MLA the
    compressed latent and the shared rotary key, ``kv_lora_rank + qk_rope_head_dim``."""
    a = cfg.attention
    if a.kind == "mla":
        return cfg.n_layers * (a.kv_lora_rank + a.qk_rope_head_dim)
    assert a.n_kv_heads is not None and a.head_dim is not None
    return cfg.n_layers * 2 * a.n_kv_heads * a.head_dim


def kv_cache_bytes_per_token(cfg: ModelConfig, dtype: str = "bf16") -> int:
    """KV-cache bytes per token at ``dtype`` (bf16 by default)."""
    return kv_cache_values_per_token(cfg) * _dtype_bytes(dtype)


# Report -------------------------------------------------------------------------------------


def _formula(cfg: ModelConfig, p: ParamCount, f: FlopCount, kv_dtype: str) -> str:
    width = max(len(c) for c in (*COMPONENTS, "routed_experts_active"))
    lines = [f"{c.name:<{width}} = {c.text()}" for c in p.components]
    moe = cfg.moe
    if moe is not None and cfg.moe_layer_ids:
        lines.append(
            f"{'routed_experts_active':<{width}} = routed_experts × top_k / n_routed = "
            f"{p.breakdown['routed_experts']:,} × {moe.top_k} / {moe.n_routed_experts} = {p.breakdown['routed_experts_active']:,}"
        )
    parts = " + ".join(f"{p.breakdown[c]:,}" for c in COMPONENTS)
    lines.append(f"{'total':<{width}} = {parts} = {p.total:,}")
    lines.append(
        f"{'active':<{width}} = total - routed_experts + routed_experts_active = "
        f"{p.total:,} - {p.breakdown['routed_experts']:,} + {p.breakdown['routed_experts_active']:,} = {p.active:,}"
    )
    if p.tied_embeddings:
        lines.append(f"{'':<{width}}   (tied embeddings: the output head reuses the embedding matrix, counted once)")
    dqk, dv = _attention_widths(cfg)
    ctx = f"({f.seq_len}+1)" if f.causal else f"2·{f.seq_len}"
    lines.append(
        f"{'FLOPs/token':<{width}} = 2·N_matmul + {'' if f.causal else '2·'}L·H·(d_qk+d_v)·{'(S+1)' if f.causal else 'S'} = "
        f"2·{p.matmul_active:,} + {cfg.n_layers}·{cfg.attention.n_heads}·({dqk}+{dv})·{ctx} = {f.forward_per_token:,}"
    )
    lines.append(
        f"{'train FLOPs/seq':<{width}} = 3 × FLOPs/token × S = 3 × {f.forward_per_token:,} × {f.seq_len} = {f.train_per_sequence:,}"
    )
    a = cfg.attention
    if a.kind == "mla":
        kv = f"L·(kv_lora_rank + qk_rope_head_dim)·bytes = {cfg.n_layers}·({a.kv_lora_rank}+{a.qk_rope_head_dim})"
    else:
        kv = f"L·2·G·hd·bytes = {cfg.n_layers}·2·{a.n_kv_heads}·{a.head_dim}"
    bytes_ = _dtype_bytes(kv_dtype)
    lines.append(
        f"{'KV cache/token':<{width}} = {kv}·{bytes_} = {kv_cache_bytes_per_token(cfg, kv_dtype):,} B ({kv_dtype})"
    )
    return "\n".join(lines)


def account(cfg: ModelConfig, seq_len: int = 4096, *, kv_dtype: str = "bf16", causal: bool = False) -> Report:
    """The full accounting report of ``cfg`` (parameters, FLOPs at ``seq_len``, memory)."""
    p = count_params(cfg)
    f = count_flops(cfg, seq_len, causal=causal)
    return Report(
        name=cfg.name,
        params=p,
        flops=f,
        weights_bytes=weights_bytes(cfg),
        kv_cache_dtype=kv_dtype,
        kv_cache_bytes_per_token=kv_cache_bytes_per_token(cfg, kv_dtype),
        formula=_formula(cfg, p, f, kv_dtype),
    )


__all__ = [
    "COMPONENTS",
    "DTYPE_BYTES",
    "VENDOR_ACTIVE_CONVENTION",
    "FlopCount",
    "ParamCount",
    "Report",
    "account",
    "count_flops",
    "count_params",
    "kv_cache_bytes_per_token",
    "kv_cache_values_per_token",
    "weights_bytes",
]
