"""Safety rules for checkpoint folders moekit reads and writes.

Reading: a folder may come from anywhere, so every file it names must resolve inside it (no
``..``, no absolute path, no symlink out of it; the one exception is the Hugging Face hub cache,
whose ``snapshots/<rev>/`` files are symlinks into the repository's ``blobs/``), and a config that
ties the output head to the embedding must not come with a *different* head tensor: transformers
and moekit would each pick one, silently. We refuse it (the error says how to fix the folder).

Writing: ``plan_write`` decides what a checkpoint written into an existing folder may replace
(``moekit.files`` holds the ownership record it reads).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import Tensor

from moekit.errors import CheckpointError, MoekitError
from moekit.files import check_folder_arg, listing, read_owned, user_entries

PRETRAINED_KIND = "pretrained"
# What a checkpoint write replaces in a folder moekit did not write (only with overwrite=True).
WEIGHTS_AND_CONFIG = re.compile(r"config\.json|model(-\d+-of-\d+)?\.safetensors|model\.safetensors\.index\.json")


def member(folder: Path, name: object, what: str) -> Path:
    """``folder / name`` when it stays inside ``folder``; ``CheckpointError`` otherwise."""
    folder = Path(folder)
    if not isinstance(name, str) or not name or "\\" in name or "\0" in name:
        raise CheckpointError(f"{what} names {name!r}, which is not a file name; refusing to read it")
    rel = Path(name)
    if rel.is_absolute() or ".." in rel.parts:
        raise CheckpointError(f"{what} names {name!r}, a path outside {folder}; refusing to read it")
    path = folder / rel
    root = folder.resolve()
    allowed = [root]
    if root.parent.name == "snapshots":  # huggingface_hub cache: snapshots/<rev>/file -> ../../blobs/<sha>
        allowed.append(root.parent.parent / "blobs")
    real = path.resolve()
    if not any(real == a or a in real.parents for a in allowed):
        raise CheckpointError(f"{path} links to {real}, outside {folder}; refusing to read it")
    return path


def check_tied_head(tensors: dict[str, Tensor], tied: bool, where: str) -> None:
    """A tied config must not come with a distinct head tensor (same shape checked on meta tensors,
    same values once the data is read)."""
    if not tied:
        return
    heads = [k for k in tensors if k == "lm_head.weight" or k.endswith(".lm_head.weight")]
    embeds = [k for k in tensors if k.endswith("embed_tokens.weight") or k == "embed.weight"]
    if not heads or not embeds:
        return
    head, embed = tensors[heads[0]], tensors[embeds[0]]
    if head.is_meta or embed.is_meta:
        same = head.shape == embed.shape
    else:
        same = head.shape == embed.shape and torch.equal(head, embed.to(head.dtype))
    if not same:
        raise CheckpointError(
            f"{where}: the config ties the output head to the embedding (tie_word_embeddings), but the "
            f"folder holds a different {heads[0]}; set tie_word_embeddings to false to use that head, "
            "or remove the tensor to tie them"
        )


def _training_folder(dst: Path) -> str | None:
    kind, _ = read_owned(dst)
    if kind not in (None, PRETRAINED_KIND):
        return f"a moekit {kind} folder"
    if (dst / "checkpoints").is_dir() or (dst / "metrics.jsonl").is_file():
        return "a moekit training run"
    if (dst / "trainer.pt").is_file() and (dst / "manifest.json").is_file():
        return "a moekit training checkpoint"
    return None


def plan_write(dst: Path, overwrite: bool) -> list[str]:
    """Check that a checkpoint may be written to ``dst``; return the entries of ``dst`` to keep.

    New or empty folders, and folders holding only what moekit wrote there before, are replaced.
    Runs, training checkpoints and other moekit folders are always refused. Any other folder is
    refused unless ``overwrite``: then its weights and config are replaced and every other entry
    (README.md, LICENSE, tokenizer files, ...) is kept as it is.
    """
    dst = check_folder_arg(dst, "destination")
    entries = user_entries(dst)
    if not entries:
        return []
    what = _training_folder(dst)
    if what is not None:
        raise MoekitError(f"destination {dst} is {what}; write the checkpoint to another folder")
    kind, owned = read_owned(dst)
    foreign = [n for n in entries if n not in owned]
    replaced = [n for n in foreign if WEIGHTS_AND_CONFIG.fullmatch(n)]
    kept = [n for n in foreign if n not in replaced]
    if kind == PRETRAINED_KIND and not replaced:  # moekit's own checkpoint with the user's files beside it
        return kept
    if not overwrite:
        if replaced:
            also = f"; its other files are kept ({listing(kept)})" if kept else ""
            raise MoekitError(
                f"destination {dst} holds a model moekit did not write ({listing(replaced)}); "
                f"pass --overwrite to replace its weights and config{also}"
            )
        raise MoekitError(
            f"destination {dst} is not empty ({listing(kept)}) and was not written by moekit; choose a new "
            "folder, or pass --overwrite to write the checkpoint beside those files (they are kept)"
        )
    return kept


__all__ = ["PRETRAINED_KIND", "check_tied_head", "member", "plan_write"]
