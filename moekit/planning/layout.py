"""What each rank holds under a parallel layout (the contract of ``moekit.parallel``).

``Layout(dp, ep, etp)`` (defined once, as plain data, in ``moekit.parallel.layout``) runs on
``world = dp × etp`` ranks; ``ep`` divides ``dp`` and the routed experts, ``etp`` divides the
expert width F. Each rank holds ``E / ep`` routed experts of every MoE layer, each sliced to
``F / etp`` (w1/w3 by output rows, w2 by input columns, b1/b3 sliced, b2 whole; partial sums
all-reduced over the etp group, distributed-llama style). Everything else (embedding, attention,
norms, routers, shared experts, dense FFNs, head) is replicated on every
rank (DDP semantics). The etp ranks of a group see the same tokens.

Pure functions over plain ints, so the counts can be checked against a model the parallel code
actually shards (``per_rank_parameter_count``).
"""

from __future__ import annotations

from dataclasses import dataclass

from moekit.accounting import count_params
from moekit.config import ConfigError, ModelConfig
from moekit.parallel.layout import Layout


@dataclass(frozen=True)
class ParamSplit:
    """Parameters as the layout splits them: the replicated part and one routed expert's parts."""

    replicated: int  # everything but the routed experts
    per_expert_sliced: int  # one expert's parameters sliced by etp (w1, w3, w2, b1, b3)
    per_expert_whole: int  # one expert's parameters every etp rank holds whole (b2)
    n_routed_experts: int
    n_moe_layers: int
    expert_ffn_dim: int

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> ParamSplit:
        p = count_params(cfg)
        n_moe = len(cfg.moe_layer_ids)
        if cfg.moe is None or not n_moe:
            return cls(p.total, 0, 0, 1, 0, 1)
        m, d = cfg.moe, cfg.d_model
        sliced = 3 * d * m.expert_ffn_dim + (2 * m.expert_ffn_dim if m.expert_bias else 0)
        whole = d if m.expert_bias else 0
        split = cls(p.total - p.breakdown["routed_experts"], sliced, whole, m.n_routed_experts, n_moe, m.expert_ffn_dim)
        assert split.replicated + n_moe * m.n_routed_experts * (sliced + whole) == p.total
        return split


def check_layout(layout: Layout, split: ParamSplit) -> None:
    """Raise ``ConfigError`` naming the broken rule of the layout contract."""
    for name in ("dp", "ep", "etp"):
        v = getattr(layout, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"{name} must be a positive integer, got {v!r}")
    if layout.dp % layout.ep:
        raise ConfigError(f"ep ({layout.ep}) must divide dp ({layout.dp})")
    if split.n_routed_experts % layout.ep:
        raise ConfigError(f"ep ({layout.ep}) must divide the routed experts ({split.n_routed_experts})")
    if split.expert_ffn_dim % layout.etp:
        raise ConfigError(f"etp ({layout.etp}) must divide the expert width ({split.expert_ffn_dim})")


def rank_parameter_split(
    cfg_or_counts: ModelConfig | ParamSplit, layout: Layout | tuple[int, int, int]
) -> tuple[int, int]:
    """``(replicated, routed-expert)`` parameters one rank holds under ``layout``."""
    split = cfg_or_counts if isinstance(cfg_or_counts, ParamSplit) else ParamSplit.from_config(cfg_or_counts)
    layout = layout if isinstance(layout, Layout) else Layout(*layout)
    check_layout(layout, split)
    local = split.n_routed_experts // layout.ep
    experts = split.n_moe_layers * local * (split.per_expert_sliced // layout.etp + split.per_expert_whole)
    return split.replicated, experts


def per_rank_parameter_count(cfg_or_counts: ModelConfig | ParamSplit, layout: Layout | tuple[int, int, int]) -> int:
    """Parameters one rank holds under ``layout`` = ``(dp, ep, etp)`` (see the module docstring)."""
    return sum(rank_parameter_split(cfg_or_counts, layout))


def candidate_layouts(
    devices: int, split: ParamSplit, *, dp: int | None = None, ep: int | None = None, etp: int | None = None
) -> list[Layout]:
    """Every layout of ``devices`` ranks the contract allows, restricted to the given degrees."""
    out = []
    for t in range(1, devices + 1):
        if devices % t or split.expert_ffn_dim % t or (etp is not None and t != etp):
            continue
        d = devices // t
        if dp is not None and d != dp:
            continue
        for e in range(1, d + 1):
            if d % e == 0 and split.n_routed_experts % e == 0 and (ep is None or e == ep):
                out.append(Layout(d, e, t))
    return out
