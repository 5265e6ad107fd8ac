"""What each token did inside an MoE model: the experts it chose, their gate weights, the parameters it touched.

``trace_text(model, ids)`` runs one forward pass and reads every MoE layer's routing. A token
touches the always-active parameters (embedding, attention, norms, routers, shared experts, dense
FFNs, head) plus, in every MoE layer, the routed experts it was actually sent to (kept slots:
capacity drops and expert choice make that differ from top_k). Both parts are counted from the
instantiated modules (``always_active_params``: every parameter outside the routed experts'
stacked tensors; ``params_per_expert``: one expert's slice of them), not from the analytic
accounting, so a test can check the two against each other: a token with exactly top_k experts
in every MoE layer touches exactly ``count_params(cfg).active`` parameters.

``expert_load(model, sequences)`` counts, over a corpus, the assignments each expert of each MoE
layer received (``moekit trace --data``).

Shapes: T tokens, K slots per token, E routed experts, L MoE layers.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from moekit.accounting import count_params
from moekit.errors import MoekitError
from moekit.files import save_png
from moekit.layers.experts import Experts
from moekit.models.transformer import MoETransformer


@dataclass
class LayerChoice:
    layer: int  # the model layer's index
    experts: list[int]  # routed experts the token was sent to, highest gate weight first
    weights: list[float]  # their gate weights


@dataclass
class TokenTrace:
    position: int
    token_id: int
    text: str
    layers: list[LayerChoice]
    touched_params: int  # always-active + the chosen experts of every MoE layer


@dataclass
class Trace:
    model: str
    total_params: int  # analytic (moekit.accounting)
    active_params: int  # analytic: always-active + top_k experts per MoE layer
    always_active_params: int  # from the modules: everything outside the routed experts
    params_per_expert: int  # from the modules: one routed expert's weights (and biases)
    n_routed_experts: int
    n_shared_experts: int
    top_k: int
    moe_layers: list[int]
    tokens: list[TokenTrace]

    def to_dict(self) -> dict:
        return asdict(self)


def module_counts(model: MoETransformer) -> tuple[int, int]:
    """(parameters outside the routed experts, parameters of one routed expert), from the modules."""
    experts = [m for m in model.modules() if isinstance(m, Experts)]
    routed = {id(p) for ex in experts for p in ex.parameters()}
    always = sum(p.numel() for p in model.parameters() if id(p) not in routed)
    per_expert = sum(p[0].numel() for p in experts[0].parameters()) if experts else 0
    return always, per_expert


@torch.no_grad()
def trace_text(model: MoETransformer, ids: list[int], decode=None) -> Trace:
    """Route ``ids`` (one sequence) through ``model`` and record every token's experts per MoE layer.

    ``decode(list[int]) -> str`` renders each token's text (None: its id).
    """
    cfg = model.config
    if cfg.moe is None or not cfg.moe_layer_ids:
        raise MoekitError(f"model {cfg.name or ''} has no MoE layers: there are no experts to trace".replace("  ", " "))
    if not ids:
        raise MoekitError("the text encodes to no tokens; give some text")
    if len(ids) > cfg.max_seq_len:
        raise MoekitError(f"the text is {len(ids)} tokens, more than the model's context ({cfg.max_seq_len})")
    device = next(model.parameters()).device
    out = model(torch.tensor([ids], device=device))
    always, per_expert = module_counts(model)
    counts = count_params(cfg)
    tokens = []
    for t, token_id in enumerate(ids):
        layers, n_chosen = [], 0
        for layer, routing in zip(out.moe_layer_ids, out.routing, strict=True):
            keep_K = (
                routing.keep_TK[t]
                if routing.keep_TK is not None
                else torch.ones_like(routing.idx_TK[t], dtype=torch.bool)
            )
            experts_K, weights_K = routing.idx_TK[t][keep_K], routing.weights_TK[t][keep_K].float()
            order = weights_K.argsort(descending=True, stable=True)
            layers.append(
                LayerChoice(layer, experts_K[order].tolist(), [round(w, 6) for w in weights_K[order].tolist()])
            )
            n_chosen += int(keep_K.sum())
        text = decode([token_id]) if decode is not None else str(token_id)
        tokens.append(TokenTrace(t, token_id, text, layers, always + n_chosen * per_expert))
    moe = cfg.moe
    return Trace(
        model=cfg.name,
        total_params=counts.total,
        active_params=counts.active,
        always_active_params=always,
        params_per_expert=per_expert,
        n_routed_experts=moe.n_routed_experts,
        n_shared_experts=moe.n_shared_experts,
        top_k=moe.top_k,
        moe_layers=list(out.moe_layer_ids),
        tokens=tokens,
    )


@dataclass
class LayerLoad:
    layer: int
    counts: list[int]  # assignments each routed expert received
    max_vio: float  # (max load - mean load) / mean load (Wang et al. 2024)
    unused: int  # experts that received nothing


@torch.no_grad()
def expert_load(model: MoETransformer, sequences: Iterable[Tensor]) -> list[LayerLoad]:
    """Assignments per routed expert of every MoE layer over ``sequences`` (each ``[1, T]`` ids)."""
    totals: dict[int, Tensor] = {}
    for ids in sequences:
        out = model(ids)
        for layer, routing in zip(out.moe_layer_ids, out.routing, strict=True):
            c = routing.counts_E.cpu()
            totals[layer] = totals[layer] + c if layer in totals else c.clone()
    loads = []
    for layer, c in sorted(totals.items()):
        mean = c.float().mean()
        vio = float((c.max() - mean) / mean) if mean > 0 else 0.0
        loads.append(LayerLoad(layer, c.tolist(), round(vio, 6), int((c == 0).sum())))
    return loads


def plot_trace(trace: Trace, path: str, max_tokens: int = 64) -> None:
    """Tokens x (MoE layers x slots) image, each cell coloured by the expert (slots by gate weight)."""
    plt, colors = _pyplot()
    tokens = trace.tokens[:max_tokens]
    n_layers, k = len(trace.moe_layers), max((len(c.experts) for t in tokens for c in t.layers), default=1)
    import numpy as np

    grid = np.full((len(tokens), n_layers * k), np.nan)
    for i, tok in enumerate(tokens):
        for j, choice in enumerate(tok.layers):
            for s, e in enumerate(choice.experts[:k]):
                grid[i, j * k + s] = e
    e_max = max(trace.n_routed_experts, 1)
    fig, ax = plt.subplots(figsize=(2.0 + 0.32 * n_layers * k, 1.6 + 0.26 * len(tokens)))
    cmap = colors.ListedColormap(plt.get_cmap("tab20" if e_max <= 20 else "gist_ncar")(np.linspace(0, 1, e_max)))
    im = ax.imshow(grid, aspect="auto", cmap=cmap, vmin=-0.5, vmax=e_max - 0.5, interpolation="nearest")
    if grid.size <= 1500:
        for (i, c), e in np.ndenumerate(grid):
            if not np.isnan(e):
                ax.text(c, i, str(int(e)), ha="center", va="center", fontsize=6, color="black")
    ax.set_yticks(range(len(tokens)), [f"{t.position} {t.text!r}"[:24] for t in tokens], fontsize=7)
    ax.set_xticks([j * k + (k - 1) / 2 for j in range(n_layers)], [f"layer {layer}" for layer in trace.moe_layers])
    for j in range(1, n_layers):
        ax.axvline(j * k - 0.5, color="white", linewidth=2)
    ax.set_title(
        f"{trace.model or 'model'}: experts per token and MoE layer (top-{trace.top_k}, highest gate weight left)",
        fontsize=9,
    )
    fig.colorbar(im, ax=ax, label="routed expert", fraction=0.03)
    fig.tight_layout()
    save_png(fig, path, dpi=110, what="--plot")
    plt.close(fig)


def plot_load(loads: list[LayerLoad], path: str, title: str) -> None:
    """One bar chart per MoE layer: each expert's share of the assignments, the uniform share dashed."""
    plt, _ = _pyplot()
    n = len(loads)
    cols = min(n, 4)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.6 * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis("off")
    for ax, load in zip(axes.flat, loads, strict=False):
        total = sum(load.counts) or 1
        shares = [c / total for c in load.counts]
        ax.bar(range(len(shares)), shares, width=0.9)
        ax.axhline(1 / len(shares), color="black", linestyle="--", linewidth=0.8)
        ax.set_title(f"layer {load.layer}: MaxVio {load.max_vio:.2f}, unused {load.unused}", fontsize=8)
        ax.set_xlabel("expert", fontsize=7)
        ax.set_ylabel("share of assignments", fontsize=7)
        ax.tick_params(labelsize=6)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    save_png(fig, path, dpi=110, what="--plot")
    plt.close(fig)


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.colors as colors
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise MoekitError("--plot needs matplotlib (pip install 'moekit[plot]')") from e
    return plt, colors


__all__ = [
    "LayerChoice",
    "LayerLoad",
    "TokenTrace",
    "Trace",
    "expert_load",
    "module_counts",
    "plot_load",
    "plot_trace",
    "trace_text",
]
