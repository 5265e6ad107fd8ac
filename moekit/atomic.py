"""Atomic folder writes: build a folder beside its destination, make it durable, rename it in.

A crash leaves either the old folder or the new one, never a half-written one; the leftover
temporary sibling (``.NAME.tmp-*``) is removed by the next write to the same destination.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def fsync_path(path: Path) -> None:
    """Flush a file's (or a folder's entries') data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_folder(dst: Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``dst`` to fill; on success it replaces ``dst``, else it vanishes."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    for stale in dst.parent.glob(f".{dst.name}.tmp-*"):  # left by a crash mid-write
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    tmp.chmod(0o755)  # mkdtemp's 0700 would hide the result from the user's group
    try:
        yield tmp
        for f in tmp.iterdir():  # durable before visible
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
