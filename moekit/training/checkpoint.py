"""Checkpoints: atomic, checksummed, never silently half-loaded.

A checkpoint is a folder ``<run>/checkpoints/step_0000100/`` holding

- ``model.safetensors``: the weights and buffers (the aux-free selection bias, the hash table),
  under moekit's names (a tied output head is stored once, as ``embed.weight``);
- ``config.json``: the ``ModelConfig`` and, for BPE runs, ``tokenizer.json``: with the weights
  these make the folder a moekit checkpoint folder, so ``moekit.from_pretrained`` and
  ``moekit convert`` read it directly;
- ``trainer.pt``: optimiser state, RNG states, the data position and counters;
- ``manifest.json``: the byte size and sha256 of every other file, and the architecture
  fingerprint of the model (``moekit.config.architecture_fingerprint``), written last.

Writing goes to a temporary folder beside the final one; every file and the folder are fsynced,
then the folder is renamed into place (atomic on POSIX) and its parent fsynced. So a crash leaves
either the old set of checkpoints or the new one, and a stray ``.step_*.tmp-*`` folder that the next
save removes. Reading checks the manifest first: a missing, truncated or altered file raises
``CheckpointError`` naming it, instead of loading garbage; a manifest naming a path outside the
folder is corrupt; loading into a model whose fingerprint differs names the differing fields;
``trainer.pt`` is read with ``torch.load(weights_only=True)`` only. A failed write (a full disk)
is a one-line ``RunError`` and leaves the previous checkpoints as they were.
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from moekit.atomic import atomic_folder
from moekit.config import ConfigError, ModelConfig, architecture_fingerprint, fingerprint_diff
from moekit.errors import CheckpointError
from moekit.files import write_bytes, write_errors, write_json, write_text
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
    # NOTE: serialised in memory and written by ``write_bytes`` so that a full disk fails loudly.
    with write_errors(root / name, "checkpoint"), atomic_folder(root / name) as tmp:
        weights = safetensors_bytes({k: v.contiguous() for k, v in tensors.items()}, metadata={"format": "pt"})
        write_bytes(tmp / MODEL_FILE, weights, "checkpoint weights")
        write_json(tmp / CONFIG_FILE, model.config.to_dict(), "checkpoint config")
        if tokenizer_json is not None:
            write_text(tmp / TOKENIZER_FILE, tokenizer_json, "checkpoint tokenizer")
        buf = io.BytesIO()
        torch.save(state, buf)
        write_bytes(tmp / STATE_FILE, buf.getvalue(), "trainer state")
        files = {f.name: {"bytes": f.stat().st_size, "sha256": _sha256(f)} for f in sorted(tmp.iterdir())}
        manifest = {"format": FORMAT, "step": step, "files": files}
        manifest["fingerprint"] = architecture_fingerprint(model.config)
        write_json(tmp / MANIFEST_FILE, manifest, "checkpoint manifest")
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
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} {'is not a folder' if path.exists() else 'does not exist'}")
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
        step = int(manifest["step"])
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} is incomplete: it has no {MANIFEST_FILE}; {hint}") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError):
        raise CheckpointError(f"checkpoint {path} has a corrupt {MANIFEST_FILE}; {hint}") from None
    if not isinstance(files, dict) or not set(REQUIRED) <= set(files):
        raise CheckpointError(f"checkpoint {path} has a corrupt {MANIFEST_FILE}; {hint}")
    root = path.resolve()
    for fname, expected in files.items():
        f = path / fname
        if "/" in fname or "\\" in fname or fname in ("", ".", "..") or f.resolve().parent != root:
            raise CheckpointError(f"checkpoint {path}: {MANIFEST_FILE} names {fname!r}, outside the folder; {hint}")
        if not isinstance(expected, dict) or not isinstance(expected.get("bytes"), int):
            raise CheckpointError(f"checkpoint {path} has a corrupt {MANIFEST_FILE}; {hint}")
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
    manifest = verify_checkpoint(path)
    check_fingerprint(path, manifest, model.config)
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
    try:
        return torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"checkpoint file {path / STATE_FILE} cannot be read: {reason}") from None


def check_fingerprint(path: Path, manifest: dict[str, Any], config: ModelConfig) -> None:
    """The checkpoint's architecture (its manifest's fingerprint, else its config.json) must be ``config``'s."""
    saved = manifest.get("fingerprint")
    if not isinstance(saved, dict):  # written before fingerprints: derive it from the saved config
        try:
            saved = architecture_fingerprint(ModelConfig.from_dict(json.loads((path / CONFIG_FILE).read_text())))
        except (OSError, ValueError, ConfigError):
            return  # nothing to compare; the tensor check below still catches shape changes
    diff = fingerprint_diff(saved, architecture_fingerprint(config))
    if diff:
        more = f" and {len(diff) - 3} more" if len(diff) > 3 else ""
        raise CheckpointError(
            f"checkpoint {path} holds a different architecture ({', '.join(diff[:3])}{more}; checkpoint -> "
            "this model); load it with the config it was trained with"
        )


__all__ = [
    "CheckpointError",
    "check_fingerprint",
    "checkpoint_dir",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "save_checkpoint",
    "verify_checkpoint",
]
