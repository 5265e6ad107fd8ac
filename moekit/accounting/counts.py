"""The data of a parameter count: terms, components and ``ParamCount``, and the vendors' conventions.

A count is a list of ``Component`` s (embedding, attention, routed experts, ...), each
``count × (sum of its terms) + (terms added once)``. A component says how many of its ``count``
copies one token uses (``active_count``: top_k of the routed experts of each MoE layer), and each
term whether it is a matmul weight (FLOPs) or not (norms, biases, the embedding lookup). Every
way of counting a model (moekit's ``ModelConfig``, a native reader of a type moekit cannot build,
transformers' module tree) ends in ``ParamCount.build``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from moekit.config import ConfigError

# Components that add up to the total, in display order. Counts of hybrid or extended models add
# their own (``mamba``, ``linear_attention``, ``mtp``, ...) after ``attention``.
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
    # Kimi-K2 "32B activated": 31.69B without the input embedding (32.86B with it), as DeepSeek-V3.
    "moonshot": "no_input_embedding",
    # GLM-4.5 "32B" / GLM-4.5-Air "12B": 32.08B / 12.18B without both embedding matrices (32.86B /
    # 12.80B with the head).
    "zai": "non_embedding",
    # Granite-3.0-3B-A800M "800M": 0.81B without the (tied) embedding, 0.88B with it.
    "ibm": "non_embedding",
    # MiniMax-M2 "10B": 9.80B non-embedding (10.42B with the head, 11.03B with both).
    "minimax": "non_embedding",
    # DBRX "36B": 36.47B; Jamba "12B": 12.11B; dots.llm1 "14B": 14.02B; Arctic "17B": 17.32B;
    # Hunyuan-Large "52B": 51.32B (tied embeddings) -- all with both embedding matrices.
    "databricks": "all",
    "ai21": "all",
    "rednote": "all",
    "snowflake": "all",
    "tencent": "all",
    # Ling-lite "2.75B": 2.753B; XVERSE-MoE-A4.2B "4.2B": 4.23B -- with both embedding matrices.
    "inclusionai": "all",
    "xverse": "all",
    # Skywork-MoE "22B": 22.39B without the input embedding (22.69B with it).
    "skywork": "no_input_embedding",
}


@dataclass(frozen=True)
class Term:
    """One summand of a component: a label and the numbers it multiplies, e.g. ``q 4096·4096``.

    ``matmul``: a weight a token multiplies (counted in FLOPs); False for norms, biases, sinks
    and the embedding lookup.
    """

    label: str
    factors: tuple[int, ...]
    matmul: bool = True

    @property
    def value(self) -> int:
        v = 1
        for f in self.factors:
            v *= f
        return v

    def text(self) -> str:
        return f"{self.label} " + "·".join(str(f) for f in self.factors)


@dataclass(frozen=True)
class Component:
    """``count × (sum of terms) + (sum of once)``: e.g. the attention of every layer.

    ``active_count`` of the ``count`` copies serve one token (None: all of them); ``active``
    overrides the active value outright (counts read from a module tree, expected values).
    ``in_total`` False: reported beside the total, not in it (multi-token-prediction modules).
    """

    name: str
    count: int  # how many times the bracket repeats (layers, experts, or 1)
    count_text: str  # how the count reads: "32 layers", "27 MoE layers × 64 experts", or ""
    terms: tuple[Term, ...]
    once: tuple[Term, ...] = ()  # added once, outside the bracket (the final norm)
    active_count: int | None = None
    active: int | None = None
    in_total: bool = True
    matmul: int | None = None  # overrides the matmul weights a token meets (with ``active``)

    @property
    def per_copy(self) -> int:
        return sum(t.value for t in self.terms)

    @property
    def value(self) -> int:
        return self.count * self.per_copy + sum(t.value for t in self.once)

    @property
    def active_value(self) -> int:
        if self.active is not None:
            return self.active
        n = self.count if self.active_count is None else self.active_count
        return n * self.per_copy + sum(t.value for t in self.once)

    @property
    def matmul_active(self) -> int:
        """Matmul weights one token meets in this component."""
        if self.matmul is not None:
            return self.matmul
        n = self.count if self.active_count is None else self.active_count
        return n * sum(t.value for t in self.terms if t.matmul) + sum(t.value for t in self.once if t.matmul)

    def text(self) -> str:
        body = " + ".join(t.text() for t in self.terms) or "0"
        text = f"{self.count_text} × ({body})" if self.count_text else body
        if self.once:
            text += " + " + " + ".join(t.text() for t in self.once)
        return f"{text} = {self.value:,}"


@dataclass(frozen=True)
class ParamCount:
    """Parameters by component.

    ``breakdown`` holds every component (those of ``COMPONENTS`` first; the ones ``in_total``
    sum to ``total``) plus ``routed_experts_active`` (the routed-expert parameters one token
    uses, not a summand of the total). With tied embeddings ``lm_head`` is 0 (the matrix is
    counted once, as ``embedding``) apart from an lm_head bias. ``active_breakdown`` holds the
    active part of each component. ``active_range`` is set when the active count depends on
    routing (zero-computation experts): ``active`` is then the figure under uniform routing.
    """

    total: int
    active: int
    breakdown: dict[str, int]
    active_breakdown: dict[str, int]
    # Weights a token multiplies (FLOPs base): the active parameters without the embedding lookup,
    # norms, biases and sinks, with the output head (V·d, tied or not).
    matmul_active: int
    tied_embeddings: bool
    components: tuple[Component, ...] = field(repr=False, default=())
    active_range: tuple[int, int] | None = None
    outside_total: tuple[str, ...] = ()  # components reported but not summed (e.g. "mtp")
    notes: tuple[str, ...] = ()
    tied_head_matmul: int = 0

    @classmethod
    def build(
        cls,
        components: list[Component],
        *,
        tied_embeddings: bool,
        tied_head_matmul: int = 0,
        active_range: tuple[int, int] | None = None,
        notes: tuple[str, ...] = (),
    ) -> ParamCount:
        """Sum ``components`` (``tied_head_matmul``: the V·d of a tied head, a matmul the
        components do not hold)."""
        names = [c.name for c in components]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate components in {names}")
        counted = [c for c in components if c.in_total]
        breakdown = {c.name: c.value for c in components}
        active_breakdown = {c.name: c.active_value for c in components}
        routed = next((c for c in components if c.name == "routed_experts"), None)
        breakdown["routed_experts_active"] = routed.active_value if routed is not None else 0
        return cls(
            total=sum(c.value for c in counted),
            active=sum(c.active_value for c in counted),
            breakdown=breakdown,
            active_breakdown=active_breakdown,
            matmul_active=sum(c.matmul_active for c in counted) + tied_head_matmul,
            tied_embeddings=tied_embeddings,
            components=tuple(components),
            active_range=active_range,
            outside_total=tuple(c.name for c in components if not c.in_total),
            notes=notes,
            tied_head_matmul=tied_head_matmul,
        )

    def rebuilt(self, components: list[Component], notes: tuple[str, ...] = ()) -> ParamCount:
        """The same count over changed ``components`` (say, the MTP module brought into the
        total), keeping the tied head, the active range and the notes (plus ``notes``)."""
        return ParamCount.build(
            components,
            tied_embeddings=self.tied_embeddings,
            tied_head_matmul=self.tied_head_matmul,
            active_range=self.active_range,
            notes=self.notes + notes,
        )

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
class AttentionShape:
    """The attention of a group of layers, for FLOPs and the KV cache: ``n_layers`` layers of
    ``n_heads`` heads with query/key width ``d_qk`` and value width ``d_v``, caching
    ``kv_values`` values per token per layer (2·G·hd, or MLA's latent + rotary key)."""

    n_layers: int
    n_heads: int
    d_qk: int
    d_v: int
    kv_values: int
    kv_text: str  # how kv_values reads: "2·8·128" or "(512+64)"
    # Sliding-window layers: a query sees at most ``window`` keys, and the cache keeps only the
    # last ``window`` tokens (a fixed size, not per token).
    window: int | None = None


@dataclass(frozen=True)
class Counted:
    """A model counted without a ``ModelConfig`` (a type moekit cannot build): its parameters,
    its attention layers (None when unknown: FLOPs then cover the matmuls only and the KV cache
    is not reported) and what a reader should know about the figures."""

    name: str
    params: ParamCount
    attention: tuple[AttentionShape, ...] | None
    max_seq_len: int = 4096
    quantization: dict | None = None
