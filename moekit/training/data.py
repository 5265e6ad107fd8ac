"""Training text: finding the corpus, splitting it, and cutting token arrays into batches.

The default corpus is the running interpreter's standard library (``*.py`` under
``sysconfig.get_paths()["stdlib"]``, without site-packages and test folders): real text that is
on every machine moekit runs on. ``--data`` takes a text file or a folder of text files instead.

Files go to validation when a hash of their relative path falls under ``val_fraction``, so the
split never depends on the order files are listed or on which other files exist. A single file
is split by text instead: its last ``val_fraction`` (at a line break) is held out.

Batches are non-overlapping windows of ``seq_len`` tokens, reshuffled each epoch by a generator
seeded with ``(seed, epoch)``: the batch at a given *position* (sequences consumed so far) is a
pure function of the tokens, the seed and the position, which is what makes resuming exact.
"""

from __future__ import annotations

import hashlib
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from moekit.errors import MoekitError


class DataError(MoekitError):
    """The training data cannot be used (missing, empty, binary, too short)."""


# Standard-library folders left out of the default corpus: installed packages and tests (not the
# library), codec tables (``encodings``: megabytes of generated hex literals) and the help-text
# dump ``pydoc_data`` (one 750 kB string).
STDLIB_SKIP = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__", "encodings", "pydoc_data"}
)


@dataclass
class Document:
    name: str  # path relative to the corpus root (the file name for a single file)
    text: str


@dataclass
class Corpus:
    """The text of one corpus, split into training and validation documents."""

    source: str  # "python-stdlib-3.11" or the absolute path given with --data
    train: list[Document]
    val: list[Document]
    digest: str  # sha256 of names, texts and the split: the cache key of tokenizers and tokens


def stdlib_source() -> str:
    return f"python-stdlib-{sys.version_info.major}.{sys.version_info.minor}"


def load_corpus(path: str | Path | None, val_fraction: float) -> Corpus:
    """Read the corpus at ``path`` (None: the standard library) and split it train/val."""
    if path is None:
        root = Path(sysconfig.get_paths()["stdlib"])
        docs = _read_stdlib(root)
        source = stdlib_source()
    else:
        root = Path(path).expanduser().resolve()
        if not root.exists():
            raise DataError(f"data path {path} does not exist")
        docs = [_read_text(root, root.name)] if root.is_file() else _read_folder(root)
        source = str(root)
    docs = [d for d in docs if d.text]
    if not docs:
        raise DataError(f"data path {root} holds no text (no non-empty files found)")
    train, val = _split(docs, val_fraction)
    h = hashlib.sha256(f"split={val_fraction!r}".encode())
    for part, split_docs in (("train", train), ("val", val)):
        for d in split_docs:
            h.update(f"\0{part}\0{d.name}\0".encode())
            h.update(d.text.encode())
    return Corpus(source=source, train=train, val=val, digest=h.hexdigest())


def _read_stdlib(root: Path) -> list[Document]:
    docs = []
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root)
        if STDLIB_SKIP.intersection(rel.parts[:-1]):
            continue
        try:
            docs.append(Document(rel.as_posix(), p.read_text(encoding="utf-8")))
        except (UnicodeDecodeError, OSError):
            continue  # a handful of deliberately odd files; the user did not choose them
    return docs


def _read_folder(root: Path) -> list[Document]:
    """Every regular file under ``root``, except hidden ones and ``__pycache__``; all must be text."""
    docs = []
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if any(part.startswith(".") or part == "__pycache__" for part in rel.parts) or not p.is_file():
            continue
        docs.append(_read_text(p, rel.as_posix()))
    if not docs:
        raise DataError(f"data folder {root} is empty: it holds no files to train on")
    return docs


def _read_text(path: Path, name: str) -> Document:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read data file {path}: {e.strerror}") from None
    not_text = DataError(f"data file {path} is not UTF-8 text (binary?); remove it or point --data at text files")
    if b"\0" in raw:  # valid UTF-8, but no text file holds NUL bytes
        raise not_text
    try:
        return Document(name, raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise not_text from None


def _val_score(name: str) -> float:
    """A number in [0, 1) fixed by the file's relative path."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") / 2**64


def _split(docs: list[Document], val_fraction: float) -> tuple[list[Document], list[Document]]:
    if len(docs) == 1:
        text = docs[0].text
        cut = int(len(text) * (1 - val_fraction))
        line = text.rfind("\n", 0, cut)
        cut = line + 1 if line > 0 else cut
        return [Document(docs[0].name, text[:cut])], [Document(docs[0].name, text[cut:])]
    val = [d for d in docs if _val_score(d.name) < val_fraction]
    if not val:  # few files: hold out the one with the lowest score, so there is always a val set
        val = [min(docs, key=lambda d: _val_score(d.name))]
    if len(val) == len(docs):
        val = val[:-1]
    names = {d.name for d in val}
    return [d for d in docs if d.name not in names], val


# Batches --------------------------------------------------------------------------------------


def _windows(tokens: np.ndarray, seq_len: int, what: str) -> int:
    n = len(tokens) // seq_len
    if n == 0:
        raise DataError(
            f"the {what} text has {len(tokens)} tokens, fewer than train.seq_len ({seq_len}); "
            "use more data or a smaller train.seq_len"
        )
    return n


class TrainBatches:
    """Shuffled, non-overlapping ``[batch_size, seq_len]`` windows addressed by position.

    ``batch(position)`` returns sequences ``position .. position + batch_size - 1`` of the
    endless stream epoch 0, epoch 1, ...; each epoch is a fresh permutation of all windows.
    """

    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, seed: int):
        self.tokens, self.batch_size, self.seq_len, self.seed = tokens, batch_size, seq_len, seed
        self.n_windows = _windows(tokens, seq_len, "training")
        self._epoch, self._perm = -1, np.empty(0, dtype=np.int64)

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.n_windows, generator=g).numpy()
        return self._perm

    def batch(self, position: int) -> Tensor:
        rows = []
        for i in range(position, position + self.batch_size):
            epoch, j = divmod(i, self.n_windows)
            start = int(self._permutation(epoch)[j]) * self.seq_len
            rows.append(self.tokens[start : start + self.seq_len])
        return torch.from_numpy(np.stack(rows).astype(np.int64))


def val_batches(tokens: np.ndarray, batch_size: int, seq_len: int, n_batches: int) -> list[Tensor]:
    """``n_batches`` fixed validation batches of windows spread evenly over the validation tokens
    (fewer when the validation text is short)."""
    n_windows = _windows(tokens, seq_len, "validation")
    starts = np.unique(np.linspace(0, n_windows - 1, min(n_windows, n_batches * batch_size)).astype(np.int64))
    rows = np.stack([tokens[s * seq_len : (s + 1) * seq_len] for s in starts]).astype(np.int64)
    return list(torch.from_numpy(rows).split(batch_size))


__all__ = [
    "Corpus",
    "DataError",
    "Document",
    "TrainBatches",
    "load_corpus",
    "stdlib_source",
    "val_batches",
]
