"""Byte and BPE tokenizers, and the cache of tokenizers and token arrays."""

from __future__ import annotations

import numpy as np

from moekit.training.data import load_corpus
from moekit.training.tokenizer import BPETokenizer, ByteTokenizer, cache_root, get_tokenizer, tokenize


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    text = "déjà vu ✓\n\tdef f(): pass"
    (ids,) = tok.encode_batch([text])
    assert max(ids) < 256 and tok.decode(ids) == text


def test_bpe_trained_once_cached_and_round_trips(text_dir):
    corpus = load_corpus(text_dir, 0.3)
    tok = get_tokenizer("bpe", 400, corpus)
    assert tok.vocab_size == 400 and tok.eot_id == 0
    cached = list((cache_root() / "corpora").rglob("bpe-400.json"))
    assert len(cached) == 1
    again = get_tokenizer("bpe", 400, corpus)
    assert again.to_str() == tok.to_str()
    text = corpus.val[0].text[:500]
    (ids,) = tok.encode_batch([text])
    assert tok.decode(ids) == text
    assert len(ids) < 0.8 * len(text.encode())  # merges compress real text
    assert BPETokenizer.from_str(tok.to_str()).encode_batch([text])[0] == ids


def test_tokenized_corpus_is_cached_per_tokenizer(text_dir):
    corpus = load_corpus(text_dir, 0.3)
    tok = ByteTokenizer()
    train, val = tokenize(tok, corpus)
    expected = sum(len(d.text.encode()) + 1 for d in corpus.train)  # + one EOT per document
    assert len(train) == expected and train.dtype == np.uint16
    assert (np.asarray(train) == 0).sum() == len(corpus.train)
    files = sorted(p.name for p in (cache_root() / "corpora" / corpus.digest[:16]).glob("byte-*.npy"))
    assert len(files) == 2
    train2, _ = tokenize(tok, corpus)
    assert np.array_equal(train, train2)
