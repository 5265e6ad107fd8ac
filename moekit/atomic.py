"""Atomic folder writes: build a folder beside its destination, make it durable, rename it in.

A crash leaves either the old folder or the new one, never a half-written one; the leftover
temporary sibling (``.NAME.tmp-*``) is removed by the next write to the same destination.
Entries of the old folder named in ``carry`` (files moekit did not write: a README, a licence,
tokenizer files) are hard-linked into the new folder before it replaces the old one, so they
survive byte for byte (copied where the file system has no hard links).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path


def fsync_path(path: Path) -> None:
    """Flush a file's (or a folder's entries') data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _link_tree(src: Path, dst: Path) -> None:
    if src.is_symlink():
        os.symlink(os.readlink(src), dst)
    elif src.is_dir():
        shutil.copytree(src, dst, symlinks=True, copy_function=_link_or_copy)
    else:
        _link_or_copy(src, dst)


def _link_or_copy(src: str | Path, dst: str | Path) -> None:
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError:
        shutil.copy2(src, dst, follow_symlinks=False)


@contextmanager
def atomic_folder(dst: Path, carry: Iterable[str] = ()) -> Iterator[Path]:
    """Yield a temporary sibling of ``dst`` to fill; on success it replaces ``dst`` (keeping the
    old folder's entries named in ``carry`` unless the new folder has them), else it vanishes."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    for stale in dst.parent.glob(f".{dst.name}.tmp-*"):  # left by a crash mid-write
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    tmp.chmod(0o755)  # mkdtemp's 0700 would hide the result from the user's group
    try:
        yield tmp
        for name in carry:
            if (dst / name).exists() or (dst / name).is_symlink():
                if not (tmp / name).exists():
                    _link_tree(dst / name, tmp / name)
        for f in tmp.iterdir():  # durable before visible
            if f.is_file() and not f.is_symlink():
                fsync_path(f)
        fsync_path(tmp)
        if dst.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=dst.parent))
            os.replace(dst, old)  # over the empty placeholder
            os.replace(tmp, dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dst)
        fsync_path(dst.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
