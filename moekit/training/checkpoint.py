"""Checkpoints: atomic, checksummed, never silently half-loaded.

A checkpoint is a folder ``<run>/checkpoints/step_0000100/`` holding

- ``model.safetensors``: the weights and buffers (the aux-free selection bias, the hash table),
  under moekit's names (a tied output head is stored once, as ``embed.weight``);
- ``config.json``: the ``ModelConfig`` and, for BPE runs, ``tokenizer.json``: with the weights
  these make the folder a moekit checkpoint folder, so ``moekit.from_pretrained`` and
  ``moekit convert`` read it directly;
- ``trainer.pt``: optimiser state, RNG states, the data position and counters;
- ``manifest.json``: the byte size and sha256 of every other file, written last.

Writing goes to a temporary folder beside the final one; every file and the folder are fsynced,
then the folder is renamed into place (atomic on POSIX) and its parent fsynced. So a crash leaves
either the old set of checkpoints or the new one, and a stray ``.step_*.tmp-*`` folder that the next
save removes. Reading checks the manifest first: a missing, truncated or altered file raises
``CheckpointError`` naming it, instead of loading garbage.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from moekit.atomic import atomic_folder
from moekit.errors import CheckpointError
from moekit.models.transformer import MoETransformer

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
STATE_FILE = "trainer.pt"
MANIFEST_FILE = "manifest.json"
REQUIRED = (MODEL_FILE, CONFIG_FILE, STATE_FILE)
FORMAT = 1


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: MoETransformer,
    state: dict[str, Any],
    keep: int,
    tokenizer_json: str | None = None,
    tensors: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write the checkpoint of ``step`` atomically and delete all but the newest ``keep``.

    ``tensors`` replaces ``model.state_dict()`` (a parallelised model's gathered weights)."""
    root = checkpoint_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".step_*.tmp-*"):  # left by a crash mid-save of any step
        shutil.rmtree(stale, ignore_errors=True)
    name = f"step_{step:07d}"
    tensors = dict(model.state_dict() if tensors is None else tensors)
    if model.config.tie_embeddings:
        tensors.pop("lm_head.weight")
    # A step saved again (a resumed run that had already finished) replaces the old folder.
    with atomic_folder(root / name) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp / MODEL_FILE, metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(model.config.to_dict(), indent=2) + "\n")
        if tokenizer_json is not None:
            (tmp / TOKENIZER_FILE).write_text(tokenizer_json)
        torch.save(state, tmp / STATE_FILE)
        files = {f.name: {"bytes": f.stat().st_size, "sha256": _sha256(f)} for f in sorted(tmp.iterdir())}
        manifest = {"format": FORMAT, "step": step, "files": files}
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    final = root / name
    for old_ckpt in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old_ckpt)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoint folders of a run, oldest first (whether or not they are intact)."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    return sorted((p for p in root.glob("step_*") if p.is_dir()), key=lambda p: p.name)


def latest_checkpoint(run_dir: Path) -> Path | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def verify_checkpoint(path: Path) -> dict[str, Any]:
    """The manifest of an intact checkpoint; ``CheckpointError`` naming the bad file otherwise."""
    path = Path(path)
    hint = f"delete {path} to fall back to an earlier checkpoint"
    manifest_path = path / MANIFEST_FILE
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
        step = int(manifest["step"])
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} is incomplete: it has no {MANIFEST_FILE}; {hint}") from None
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError):
        raise CheckpointError(f"checkpoint {path} has a corrupt {MANIFEST_FILE}; {hint}") from None
    if not isinstance(files, dict) or not set(REQUIRED) <= set(files):
        raise CheckpointError(f"checkpoint {path} has a corrupt {MANIFEST_FILE}; {hint}")
    for fname, expected in files.items():
        f = path / fname
        if not f.is_file():
            raise CheckpointError(f"checkpoint file {f} is missing; {hint}")
        size = f.stat().st_size
        if size != expected["bytes"]:
            raise CheckpointError(
                f"checkpoint file {f} is truncated or corrupt ({size} bytes, expected {expected['bytes']}); {hint}"
            )
        if _sha256(f) != expected["sha256"]:
            raise CheckpointError(f"checkpoint file {f} is corrupt (sha256 mismatch); {hint}")
    return {"step": step, **manifest}


def load_checkpoint(path: Path, model: MoETransformer, device: torch.device | str = "cpu") -> dict[str, Any]:
    """Verify, load the weights into ``model`` in place and return the trainer state."""
    path = Path(path)
    verify_checkpoint(path)
    try:
        tensors = load_file(path / MODEL_FILE, device=str(device))
    except SafetensorError as e:  # intact by checksum, so written by something else
        raise CheckpointError(f"checkpoint file {path / MODEL_FILE} cannot be read: {e}") from None
    if model.config.tie_embeddings and "embed.weight" in tensors:
        tensors["lm_head.weight"] = tensors["embed.weight"]
    try:
        missing, unexpected = model.load_state_dict(tensors, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise CheckpointError(f"checkpoint {path} does not fit this model: {str(e).splitlines()[-1].strip()}") from None
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {path} does not fit this model (missing: {sorted(missing)[:3]}, "
            f"unexpected: {sorted(unexpected)[:3]}); was the config changed?"
        )
    return torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)


__all__ = [
    "CheckpointError",
    "checkpoint_dir",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "save_checkpoint",
    "verify_checkpoint",
]
