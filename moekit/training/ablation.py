"""Expert ablation: how much does the loss rise when a layer's busiest routed experts are disabled?

The DeepSeekMoE paper (Dai et al. 2024, §4.5, Fig. 4) disables the top routed experts of a trained
model and finds DeepSeekMoE's loss rises more than GShard's: its experts are more specialised
(less redundant), so no other expert can stand in. A disabled expert is removed from every
token's choice by a -inf selection bias, so tokens fall back to their next-best experts; gate
weights still come from the unbiased scores. Hash routing ignores the selection bias, so hash
layers cannot be ablated this way.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor

from moekit.layers.router import Router
from moekit.models.transformer import MoETransformer
from moekit.training.data import val_batches
from moekit.training.loop import evaluate, load_run, prepare_data


def _routers(model: MoETransformer) -> list[Router]:
    return [m for m in model.modules() if isinstance(m, Router)]


@contextlib.contextmanager
def disabled_experts(model: MoETransformer, experts: list[list[int]]) -> Iterator[None]:
    """Within the block, MoE layer i (in layer order) never routes to ``experts[i]``."""
    routers = _routers(model)
    if len(experts) != len(routers):
        raise ValueError(f"got expert lists for {len(experts)} MoE layers, the model has {len(routers)}")
    if any(r.cfg.router == "hash" for r in routers):
        raise ValueError("hash routing ignores the selection bias: its experts cannot be disabled this way")
    for r, disabled in zip(routers, experts, strict=True):
        if r.n_experts - len(set(disabled)) < r.top_k:
            raise ValueError(
                f"disabling {len(set(disabled))} of {r.n_experts} experts leaves fewer than top_k ({r.top_k})"
            )
    saved = [r.selection_bias for r in routers]
    try:
        for r, disabled in zip(routers, experts, strict=True):
            gate = r.gate
            assert gate is not None
            bias = torch.zeros(r.n_experts, device=gate.weight.device) if r.selection_bias is None else r.selection_bias
            mask = torch.zeros_like(bias)
            mask[disabled] = float("-inf")
            r.selection_bias = bias + mask
        yield
    finally:
        for r, bias in zip(routers, saved, strict=True):
            r.selection_bias = bias


def expert_ablation(model: MoETransformer, batches: list[Tensor], device: torch.device, n_disable: int = 1) -> dict:
    """Validation loss before and after disabling each MoE layer's ``n_disable`` most-routed experts
    (measured on the same batches). Returns ``base_loss``, ``ablated_loss``, ``delta`` (their
    difference), ``relative_delta`` (delta / base_loss), ``disabled`` (experts per layer) and
    ``n_experts`` (routed experts per layer)."""
    base = evaluate(model, batches, device)
    top = [sorted(range(len(load)), key=lambda e: -load[e])[:n_disable] for load in base["expert_load"]]
    with disabled_experts(model, top):
        ablated = evaluate(model, batches, device)
    delta = ablated["val_loss"] - base["val_loss"]
    return {
        "base_loss": base["val_loss"],
        "ablated_loss": ablated["val_loss"],
        "delta": delta,
        "relative_delta": delta / base["val_loss"],
        "disabled": top,
        "n_experts": [len(load) for load in base["expert_load"]],
    }


def specialisation_test(
    run_dirs: dict[str, Path], device: str | None = None, fractions: tuple[float | None, ...] = (None, 1 / 8)
) -> dict[str, list[dict]]:
    """``expert_ablation`` of each trained run (newest checkpoint, its own validation batches),
    once per entry of ``fractions``: None disables each layer's single most-routed expert; a
    fraction disables that share of the routed experts (at least one), which is the paper's axis
    and the fair one between models with 8 and 31 experts."""
    results = {}
    for name, run_dir in run_dirs.items():
        loaded = load_run(run_dir, device=device)
        t = loaded.config.train
        data = prepare_data(loaded.config, loaded.tokenizer)
        batches = val_batches(data.val_tokens, t.batch_size, t.seq_len, t.eval_batches)
        dev = next(loaded.model.parameters()).device
        moe = loaded.config.model.moe
        assert moe is not None
        results[name] = [
            expert_ablation(loaded.model, batches, dev, 1 if f is None else max(1, round(f * moe.n_routed_experts)))
            for f in fractions
        ]
    return results


__all__ = ["disabled_experts", "expert_ablation", "specialisation_test"]
