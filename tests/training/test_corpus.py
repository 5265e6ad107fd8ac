"""Corpus reading and splitting, batches addressed by position."""

from __future__ import annotations

import numpy as np
import pytest

from moekit.training.data import DataError, TrainBatches, load_corpus, val_batches


def test_folder_split_is_by_file_and_deterministic(text_dir):
    a = load_corpus(text_dir, 0.3)
    b = load_corpus(text_dir, 0.3)
    names = sorted(p.relative_to(text_dir).as_posix() for p in text_dir.rglob("*.py"))
    train, val = [d.name for d in a.train], [d.name for d in a.val]
    assert sorted(train + val) == names and not set(train) & set(val)
    assert val and train
    assert (train, val, a.digest) == ([d.name for d in b.train], [d.name for d in b.val], b.digest)
    assert a.digest != load_corpus(text_dir, 0.5).digest  # the split is part of the cache key


def test_split_does_not_depend_on_other_files(text_dir, tmp_path):
    """A file's side of the split is fixed by its own path, so adding files moves no one else."""
    import shutil

    shutil.copytree(text_dir, tmp_path / "c")
    before = {d.name for d in load_corpus(tmp_path / "c", 0.3).val}
    for i in range(20):
        (tmp_path / "c" / f"extra_{i}.txt").write_text(f"extra {i}\n")
    after = {d.name for d in load_corpus(tmp_path / "c", 0.3).val}
    assert before <= after


def test_single_file_split_at_a_line_break(tmp_path):
    f = tmp_path / "one.txt"
    f.write_text("".join(f"line {i}\n" for i in range(100)))
    c = load_corpus(f, 0.1)
    assert c.train[0].text + c.val[0].text == f.read_text()
    assert c.train[0].text.endswith("\n") and c.val[0].text.startswith("line ")
    assert 0.05 < len(c.val[0].text) / len(f.read_text()) < 0.15


def test_default_corpus_is_the_stdlib_without_tests():
    c = load_corpus(None, 0.05)
    names = [d.name for d in c.train + c.val]
    assert "os.py" in names and len(c.val) > 5
    assert not [n for n in names if "/test/" in f"/{n}" or "site-packages" in n]


def test_empty_folder_binary_file_and_missing_path(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty.*no files"):
        load_corpus(tmp_path / "empty", 0.1)
    (tmp_path / "mixed").mkdir()
    (tmp_path / "mixed" / "a.txt").write_text("hello\n")
    (tmp_path / "mixed" / "b.bin").write_bytes(bytes(range(256)))
    with pytest.raises(DataError, match=r"b\.bin is not UTF-8 text"):
        load_corpus(tmp_path / "mixed", 0.1)
    with pytest.raises(DataError, match="does not exist"):
        load_corpus(tmp_path / "nope", 0.1)


def test_train_batches_cover_each_epoch_once_and_are_addressable():
    tokens = np.arange(10 * 4, dtype=np.uint16)  # 10 windows of 4 tokens
    b = TrainBatches(tokens, batch_size=5, seq_len=4, seed=3)
    epoch0 = np.concatenate([b.batch(0).numpy(), b.batch(5).numpy()])
    assert sorted(epoch0[:, 0].tolist()) == list(range(0, 40, 4))  # every window once
    assert (epoch0[:, 1:] - epoch0[:, :1] == [1, 2, 3]).all()  # contiguous windows
    epoch1 = np.concatenate([b.batch(10).numpy(), b.batch(15).numpy()])
    assert sorted(epoch1[:, 0].tolist()) == list(range(0, 40, 4)) and (epoch1 != epoch0).any()
    fresh = TrainBatches(tokens, batch_size=5, seq_len=4, seed=3)
    assert (fresh.batch(15) == b.batch(15)).all()  # no hidden state: position alone decides
    assert (TrainBatches(tokens, 5, 4, seed=4).batch(0) != b.batch(0)).any()


def test_too_little_text_is_a_clear_error():
    with pytest.raises(DataError, match="fewer than train.seq_len"):
        TrainBatches(np.arange(10, dtype=np.uint16), 2, 16, 0)
    with pytest.raises(DataError, match="validation text"):
        val_batches(np.arange(10, dtype=np.uint16), 2, 16, 1)
