"""moekit training run directories as checkpoint folders: ``from_pretrained(run_dir)`` loads the
run's newest checkpoint.

A run directory (written by ``moekit train``, see ``moekit.training.loop``) holds a ``config.json``
of the form ``{"model": ..., "train": ...}`` and ``checkpoints/step_NNNNNNN/`` folders, each a
moekit checkpoint folder (``config.json`` + ``model.safetensors``, plus ``tokenizer.json`` for BPE
runs). Byte-level runs ship no tokenizer file: their tokenizer is known from the run config.
NOTE: this reads the layout only (no import of ``moekit.training``, which sits beside interop);
tests load a real trained run so that the two cannot drift apart.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from moekit.errors import CheckpointError

RUN_CONFIG, CHECKPOINTS = "config.json", "checkpoints"


@dataclass
class RunFolder:
    checkpoint: Path  # the checkpoint folder to load
    tokenizer_kind: str | None  # the run's train.tokenizer ("bpe" or "byte"), None if unknown


def _run_config(folder: Path) -> dict | None:
    """The run config of a run directory, or None when ``folder`` is not one."""
    path = folder / RUN_CONFIG
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None  # not ours to judge: the checkpoint loader reports unreadable configs
    if isinstance(raw, dict) and isinstance(raw.get("model"), dict) and isinstance(raw.get("train"), dict):
        return raw
    return None


def newest_checkpoint(run_dir: Path) -> Path:
    steps = sorted(p for p in (run_dir / CHECKPOINTS).glob("step_*") if p.is_dir())
    if not steps:
        raise CheckpointError(f"{run_dir} is a moekit run directory without checkpoints ({run_dir / CHECKPOINTS})")
    return steps[-1]


def resolve_run_folder(path: str | Path) -> RunFolder | None:
    """What to load for a run directory (its newest checkpoint) or for a checkpoint inside one;
    None for any other folder."""
    folder = Path(path)
    run = _run_config(folder)
    if run is not None:
        return RunFolder(newest_checkpoint(folder), run["train"].get("tokenizer", "bpe"))
    if folder.parent.name == CHECKPOINTS:
        run = _run_config(folder.parent.parent)
        if run is not None:
            return RunFolder(folder, run["train"].get("tokenizer", "bpe"))
    return None


__all__ = ["RunFolder", "newest_checkpoint", "resolve_run_folder"]
