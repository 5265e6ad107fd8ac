"""PNG plots of training runs, read from their files only (no model is loaded).

- ``plot_losses``: training and validation loss per step, and MaxVio per step for MoE runs;
- ``plot_expert_load``: a heatmap of the last evaluation's expert load, MoE layer x expert, as
  a multiple of the uniform share (1.0 = perfectly balanced);
- ``plot_val_curves``: validation loss of several runs on one axis (``moekit compare``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from moekit.config import ModelConfig
from moekit.errors import MoekitError
from moekit.files import check_folder_arg, save_png, write_errors
from moekit.training.metrics import read_metrics


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise MoekitError("plotting needs matplotlib: pip install 'moekit[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_losses(records: list[dict[str, Any]], path: Path, title: str = "") -> Path:
    plt = _pyplot()
    train = [r for r in records if r.get("loss") is not None]
    val = [r for r in records if r.get("val_loss") is not None]
    vio = [r for r in records if r.get("max_vio") is not None]
    fig, axes = plt.subplots(1, 2 if vio else 1, figsize=(11 if vio else 6, 4), squeeze=False)
    ax = axes[0][0]
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train", lw=1)
    ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation", ms=3)
    ax.set(xlabel="step", ylabel="loss (nats/token)", title=title or "loss")
    ax.legend()
    ax.grid(alpha=0.3)
    if vio:
        ax = axes[0][1]
        ax.plot([r["step"] for r in vio], [r["max_vio"] for r in vio], lw=1, color="tab:red")
        ax.set(xlabel="step", ylabel="MaxVio (mean over MoE layers)", title="load imbalance (0 = balanced)")
        ax.set_ylim(bottom=0, top=max(r["max_vio"] for r in vio) * 1.1 + 1e-3)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    save_png(fig, path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_expert_load(load: list[list[float]], layer_ids: list[int], path: Path, title: str = "") -> Path:
    """``load[i][e]``: share of MoE layer ``layer_ids[i]``'s assignments that went to expert e."""
    plt = _pyplot()
    n_experts = max(len(row) for row in load)
    relative = [[share * len(row) for share in row] for row in load]
    fig, ax = plt.subplots(figsize=(min(16, 2 + 0.35 * n_experts), 1.2 + 0.45 * len(load)))
    im = ax.imshow(relative, aspect="auto", cmap="viridis", vmin=0)
    ax.set_yticks(range(len(load)), [f"layer {i}" for i in layer_ids])
    ax.set_xlabel("expert")
    ax.set_title(title or "expert load (x uniform share)")
    fig.colorbar(im, ax=ax, label="load / uniform load")
    fig.tight_layout()
    save_png(fig, path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_val_curves(curves: dict[str, list[dict[str, Any]]], path: Path, title: str = "") -> Path:
    """Validation loss against tokens seen, one line per named run."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, records in curves.items():
        val = [r for r in records if r.get("val_loss") is not None]
        ax.plot([r["tokens"] for r in val], [r["val_loss"] for r in val], "o-", ms=3, label=name)
    ax.set(xlabel="training tokens", ylabel="validation loss (nats/token)", title=title or "validation loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_png(fig, path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> list[Path]:
    """``loss.png`` and, for MoE runs, ``expert_load.png`` of a run directory (into ``out``)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise MoekitError(f"run directory {run_dir} {'is not a folder' if run_dir.exists() else 'does not exist'}")
    records = read_metrics(run_dir)
    if not records:
        raise MoekitError(f"{run_dir} has no metrics.jsonl records to plot; is it a moekit run directory?")
    out_dir = check_folder_arg(out, "--out") if out is not None else run_dir
    with write_errors(out_dir, "plot folder"):
        out_dir.mkdir(parents=True, exist_ok=True)
    try:
        config = json.loads((run_dir / "config.json").read_text()) if (run_dir / "config.json").exists() else {}
    except (OSError, ValueError) as e:
        raise MoekitError(f"cannot read {run_dir / 'config.json'}: {e}") from None
    if not isinstance(config, dict) or not isinstance(config.get("model", {}), dict):
        raise MoekitError(f"{run_dir / 'config.json'} is not a moekit run config")
    name = config.get("model", {}).get("name") or run_dir.name
    paths = [plot_losses(records, out_dir / "loss.png", title=f"{name}: loss")]
    loads = [r for r in records if r.get("expert_load")]
    if loads:
        layer_ids = ModelConfig.from_dict(config["model"]).moe_layer_ids if config else list(range(len(loads[-1])))
        last = loads[-1]
        title = f"{name}: expert load at step {last['step']} (validation)"
        paths.append(plot_expert_load(last["expert_load"], layer_ids, out_dir / "expert_load.png", title))
    return paths


__all__ = ["plot_expert_load", "plot_losses", "plot_run", "plot_val_curves"]
