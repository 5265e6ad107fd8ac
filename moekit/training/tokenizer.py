"""Tokenizers for training (byte-level BPE trained with Hugging Face ``tokenizers``, or raw bytes;
both follow ``moekit.tokenizer.Tokenizer``) and the on-disk cache of trained tokenizers and
tokenised corpora.

Cache layout (``$MOEKIT_CACHE_DIR``, else ``$XDG_CACHE_HOME/moekit``, else ``~/.cache/moekit``)::

    corpora/<corpus digest[:16]>/bpe-<V>.json             the tokenizer trained on the train split
    corpora/<corpus digest[:16]>/<tokenizer id>.train.npy  token ids, documents joined by EOT
    corpora/<corpus digest[:16]>/<tokenizer id>.val.npy

The tokenizer id hashes the tokenizer itself, so token files can never be read with another
tokenizer than the one that wrote them. Files are written to a temporary name and renamed, so
two runs preparing the same corpus at once never read a half-written file.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from moekit.config import ConfigError
from moekit.tokenizer import EOT, ByteTokenizer, TextTokenizer, Tokenizer
from moekit.training.data import Corpus, Document


class BPETokenizer(TextTokenizer):
    """Byte-level BPE (GPT-2 style pre-tokenisation) with one special token, ``<|endoftext|>`` = 0,
    which separates documents in training and ends generation."""

    kind = "bpe"

    @classmethod
    def train(cls, texts: list[str], vocab_size: int) -> BPETokenizer:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        if vocab_size < 257:
            raise ConfigError(
                f"vocab_size ({vocab_size}) must be >= 257 for a BPE tokenizer (256 bytes + end-of-text); "
                "use train.tokenizer=byte for a 256-id vocabulary"
            )
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOT],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer, length=len(texts))
        return cls(tok)

    @classmethod
    def from_str(cls, text: str) -> BPETokenizer:
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_str(text))


def cache_root() -> Path:
    if os.environ.get("MOEKIT_CACHE_DIR"):
        return Path(os.environ["MOEKIT_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "moekit"


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def get_tokenizer(kind: str, vocab_size: int, corpus: Corpus, cache: Path | None = None) -> Tokenizer:
    """The byte tokenizer, or the BPE tokenizer of ``vocab_size`` trained on the corpus's train split
    (trained once, then read from the cache)."""
    if kind == "byte":
        return ByteTokenizer()
    path = (cache or cache_root()) / "corpora" / corpus.digest[:16] / f"bpe-{vocab_size}.json"
    if path.exists():
        return BPETokenizer.from_str(path.read_text())
    tok = BPETokenizer.train([d.text for d in corpus.train], vocab_size)
    _atomic_write(path, lambda p: p.write_text(tok.to_str()))
    return tok


def tokenize(tok: Tokenizer, corpus: Corpus, cache: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Train and validation token arrays of ``corpus`` (each document followed by EOT), cached."""
    tok_id = f"{tok.kind}-{hashlib.sha256(tok.to_str().encode()).hexdigest()[:12]}"
    folder = (cache or cache_root()) / "corpora" / corpus.digest[:16]
    out = []
    for split, docs in (("train", corpus.train), ("val", corpus.val)):
        path = folder / f"{tok_id}.{split}.npy"
        if not path.exists():
            arr = _encode(tok, docs)
            _atomic_write(path, lambda p, arr=arr: _save_npy(p, arr))
        out.append(np.load(path, mmap_mode="r"))
    return out[0], out[1]


def _save_npy(path: Path, arr: np.ndarray) -> None:
    with path.open("wb") as f:
        np.save(f, arr)


def _encode(tok: Tokenizer, docs: list[Document]) -> np.ndarray:
    dtype = np.uint16 if tok.vocab_size <= 2**16 else np.int32
    parts = []
    for ids in tok.encode_batch([d.text for d in docs]):
        parts.append(np.asarray(ids, dtype=dtype))
        parts.append(np.asarray([tok.eot_id], dtype=dtype))
    return np.concatenate(parts) if parts else np.empty(0, dtype=dtype)


__all__ = [
    "BPETokenizer",
    "ByteTokenizer",
    "Tokenizer",
    "cache_root",
    "get_tokenizer",
    "tokenize",
]
