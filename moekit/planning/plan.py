"""The plan: every candidate layout ranked, and what would help when none fits.

Ranking rule: layouts that fit with the headroom (total ≤ (1 − headroom) × device memory) first,
then those that fit only without it, each by the least communication per token, where figures
within 5% of the least count as equal and the leaner layout goes first (a few percent of traffic
is not worth running at the edge of memory); then the layouts that do not fit, leanest first. When nothing fits, each suggestion (more devices, a lower dtype, a
smaller micro-batch, ZeRO-3, recomputation, both) is checked by planning again; pipeline
parallelism, which moekit does not do, is sized as total ÷ usable memory.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from moekit.accounting import DTYPE_BYTES
from moekit.config import ConfigError, ModelConfig
from moekit.planning.cost import LayoutCost, PlanRequest, layout_cost
from moekit.planning.layout import ParamSplit, candidate_layouts, rank_parameter_split
from moekit.planning.units import gib


@dataclass
class Plan:
    """Every candidate layout, ranked, and what would help when none fits."""

    name: str
    request: PlanRequest
    layouts: list[LayoutCost]  # ranked: fits with headroom, fits without, the rest
    suggestions: list[str] = field(default_factory=list)
    assumptions: list[str] = field(default_factory=list)

    @property
    def fitting(self) -> list[LayoutCost]:
        return [c for c in self.layouts if c.fits]

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "request": asdict(self.request),
            "fits": bool(self.fitting),
            "best": self.fitting[0].layout.text() if self.fitting else None,
            "layouts": [c.to_dict() | {"rank": i + 1} for i, c in enumerate(self.layouts)],
            "suggestions": list(self.suggestions),
            "assumptions": list(self.assumptions),
        }


# Communication figures within this fraction of each other count as equal; more free memory wins.
COMM_TOLERANCE = 0.05


def rank_layouts(costs: list[LayoutCost]) -> list[LayoutCost]:
    """The ranking rule of the module docstring."""
    ranked: list[LayoutCost] = []
    by_comm = sorted(costs, key=lambda c: (c.comm_per_token, c.total, c.layout.etp))
    for fits in (lambda c: c.fits, lambda c: c.fits_without_headroom and not c.fits):
        members = [c for c in by_comm if fits(c)]
        while members:  # bands: everything within the tolerance of the cheapest left, leanest first
            limit = members[0].comm_per_token * (1 + COMM_TOLERANCE)
            ranked += sorted((c for c in members if c.comm_per_token <= limit), key=lambda c: c.total)
            members = [c for c in members if c.comm_per_token > limit]
    return ranked + sorted((c for c in costs if not c.fits_without_headroom), key=lambda c: (c.total, c.comm_per_token))


def _costs(cfg: ModelConfig, req: PlanRequest, fixed: dict[str, int | None], split: ParamSplit) -> list[LayoutCost]:
    layouts = candidate_layouts(req.devices, split, **fixed)
    return rank_layouts([layout_cost(cfg, req, lay, split) for lay in layouts])


def _fits(cfg: ModelConfig, req: PlanRequest, split: ParamSplit) -> LayoutCost | None:
    costs = _costs(cfg, req, {}, split)
    return costs[0] if costs and costs[0].fits else None


def assumptions(req: PlanRequest) -> list[str]:
    """The regime and the assumptions behind the figures, as sentences."""
    lines = []
    if req.mode == "train":
        regime = (
            "fp32 weights, fp32 gradients, fp32 AdamW moments: 16 B/param"
            if req.dtype == "fp32"
            else f"{req.dtype} weights and gradients, fp32 master copy and AdamW moments: 16 B/param"
        )
        lines.append(f"training regime: {regime}; one micro-batch per optimiser step (no accumulation)")
        lines.append(
            f"activations: what autograd saves for {req.micro_batch}×{req.seq_len} tokens per rank "
            f"(experts: {'fused CPU path' if req.experts_impl == 'fused' else 'rows path (grouped_mm / EP)'}, "
            f"{req.attention_kernel} attention), no recomputation"
        )
    else:
        lines.append(
            f"inference: {req.dtype} weights; KV cache at {req.dtype} for {req.micro_batch}×{req.seq_len} tokens "
            "on every rank (attention is replicated)"
        )
    lines.append(
        "all-to-all: uniform routing, (ep-1)/ep of each token's top_k rows leave the rank (dispatch + combine)"
    )
    lines.append("ETP and gradient all-reduces: ring, 2(n-1)/n of the buffer sent per rank")
    lines.append("the etp ranks of a group share their tokens; comm/token = all ranks' bytes / tokens in the step")
    if req.zero3:
        lines.append("ZeRO-3/FSDP sharding of the replicated part: moekit's parallel code does NOT run this yet")
    if req.recompute:
        lines.append(
            "full activation recomputation (moekit does NOT do it): layer inputs kept, the forward of each "
            "layer (its all-to-all and all-reduce included) repeated in backward"
        )
    return lines


def _need_devices(cfg: ModelConfig, req: PlanRequest, split: ParamSplit, limit: int) -> int | None:
    """The fewest devices above ``req.devices`` on which some layout fits, up to ``limit``: every
    count to 64, then steps of about 6%, then every count back inside the step that fitted."""
    tried, n = req.devices, req.devices + 1
    while n <= limit:
        if _fits(cfg, _replace(req, devices=n), split):
            return next(m for m in range(tried + 1, n + 1) if _fits(cfg, _replace(req, devices=m), split))
        tried, n = n, n + (1 if n < 64 else n // 16)
    return None


def _replace(req: PlanRequest, **kw) -> PlanRequest:
    return PlanRequest(**(asdict(req) | kw))


def _verdict(cfg: ModelConfig, req: PlanRequest, split: ParamSplit, what: str) -> str:
    """``what``, checked: fits on these devices (the layout), on how many, or not up to the limit."""
    c = _fits(cfg, req, split)
    if c:
        return f"{what}: fits ({c.layout.text()}, {gib(c.total)} per device)"
    limit = max(16 * req.devices, 4096)
    n = _need_devices(cfg, req, split, limit)
    return f"{what}: fits on {n} devices" if n else f"{what}: does not fit on up to {limit} devices"


def suggestions(cfg: ModelConfig, req: PlanRequest, best: LayoutCost, split: ParamSplit) -> list[str]:
    """What would make the model fit when no layout does, each checked by planning again."""
    usable = req.device_memory * (1 - req.headroom)
    out = [
        f"nothing fits: the leanest layout, {best.layout.text()}, needs {gib(best.total)} per device, {gib(usable)} usable"
    ]
    n = _need_devices(cfg, req, split, limit=max(16 * req.devices, 4096))
    if n is not None:
        out.append(f"more devices: {n} would fit")
    else:
        out.append(
            "more devices alone cannot help: the replicated part (attention, embeddings, shared experts) "
            "and the activations are on every rank"
        )
    for dt in ("bf16",) if req.mode == "train" else ("bf16", "fp8"):
        if DTYPE_BYTES[dt] < DTYPE_BYTES[req.dtype]:
            out.append(_verdict(cfg, _replace(req, dtype=dt), split, f"a lower dtype, {dt}"))
    if req.micro_batch > 1:
        out.append(_verdict(cfg, _replace(req, micro_batch=1), split, "micro-batch 1"))
    if not req.zero3:
        out.append(_verdict(cfg, _replace(req, zero3=True), split, "ZeRO-3/FSDP sharding (moekit does not run it yet)"))
    if req.mode == "train" and not req.recompute:
        out.append(
            _verdict(cfg, _replace(req, recompute=True), split, "activation recomputation (moekit does not do it)")
        )
        if not req.zero3:
            both = _replace(req, recompute=True, zero3=True)
            out.append(_verdict(cfg, both, split, "ZeRO-3 and recomputation together (neither run by moekit)"))
    stages = math.ceil(best.total / usable)
    out.append(f"pipeline parallelism over about {stages} stages (moekit does not do pipeline parallelism)")
    if req.mode == "train":
        offloaded = best.total - best.memory["optimizer"]
        verdict = "fits" if offloaded <= usable else "does not fit either"
        out.append(f"offloading the optimizer state to host memory: {gib(offloaded)} per device, {verdict}")
    else:
        exp_bytes = rank_parameter_split(split, best.layout)[1] * DTYPE_BYTES[req.dtype]
        offloaded = best.total - exp_bytes
        verdict = "fits" if offloaded <= usable else "does not fit either"
        out.append(f"offloading the routed experts to host memory: {gib(offloaded)} per device, {verdict}")
    return out


def plan(
    cfg: ModelConfig, req: PlanRequest, *, dp: int | None = None, ep: int | None = None, etp: int | None = None
) -> Plan:
    """Rank every layout of ``req.devices`` (restricted by any given degree) for ``cfg``."""
    split = ParamSplit.from_config(cfg)
    fixed = {"dp": dp, "ep": ep, "etp": etp}
    for name, v in fixed.items():
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ConfigError(f"--{name} must be a positive integer, got {v!r}")
    costs = _costs(cfg, req, fixed, split)
    if not costs:
        given = ", ".join(f"{k}={v}" for k, v in fixed.items() if v is not None)
        raise ConfigError(
            f"no layout of {req.devices} devices has {given}: need dp × etp = devices, ep dividing dp and the "
            f"{split.n_routed_experts} routed experts, etp dividing the expert width {split.expert_ffn_dim}"
        )
    result = Plan(cfg.name or "model", req, costs, assumptions=assumptions(req))
    if not result.fitting:
        result.suggestions = suggestions(cfg, req, costs[0], split)
    return result
