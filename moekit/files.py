"""What moekit may write where: ownership records, destination checks, locks, one-line write faults.

Users point moekit at their only copy of a checkpoint, so every writer follows one rule: it
replaces only files moekit wrote. A folder moekit creates (a run, a study, a converted checkpoint)
carries a small record of what it wrote, ``.moekit-files.json``::

    {"kind": "run" | "study" | "pretrained", "files": ["config.json", ...]}

A destination holding anything else is refused with a line naming what would be replaced. Single
files outside such folders (``bench --save``, PNG plots) are recognised by their content instead:
PNGs carry ``Software: moekit`` in their metadata, bench results are a JSON list of bench rows.

Writes go through ``write_bytes`` / ``write_text`` (temporary name, fsync, rename), and every
``OSError`` of a write becomes a ``RunError`` that says what could not be written and why, with
the free space when the disk is full. NOTE: tensors are serialised to bytes in memory first
(``safetensors.torch.save``, ``torch.save`` into a buffer) and written here, so every write fails
the same way: ``torch.save`` to a path reports a full disk as "unexpected pos ...", and
safetensors' ``save_file`` writes through its own code path that we cannot watch.
"""

from __future__ import annotations

import errno
import fcntl
import io
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from moekit.errors import MoekitError, RunError

OWNED_FILE = ".moekit-files.json"
LOCK_FILE = ".moekit.lock"
# moekit's bookkeeping files: never user data, ignored when deciding whether a folder is empty.
BOOKKEEPING = (OWNED_FILE, LOCK_FILE)
PNG_SOFTWARE = "moekit"  # matplotlib ``metadata={"Software": ...}`` of every PNG moekit writes


def _size(n: float) -> str:
    for scale, unit in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def write_fault(e: OSError, path: Path | str, what: str = "", needed: int | None = None) -> RunError:
    """One line for a failed write: what, where, why; free space and the size needed when the disk is full."""
    what = what or "file"
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        free = ""
        with_space = Path(path)
        while not with_space.exists() and with_space != with_space.parent:
            with_space = with_space.parent
        try:
            free = f"{_size(shutil.disk_usage(with_space).free)} free"
        except OSError:
            pass
        need = f"needs about {_size(needed)}" if needed else ""
        detail = "; ".join(s for s in (need, free) if s)
        return RunError(f"no space left on device writing {what} {path}" + (f" ({detail})" if detail else ""))
    reason = e.strerror or str(e)
    return RunError(f"cannot write {what} {path}: {reason}")


@contextmanager
def write_errors(path: Path | str, what: str = "", needed: int | None = None) -> Iterator[None]:
    """Turn any ``OSError`` raised inside into a one-line ``RunError`` about writing ``path``."""
    try:
        yield
    except OSError as e:
        raise write_fault(e, getattr(e, "filename", None) or path, what, needed) from None


def _open_for_write(path: Path):
    """The file object every moekit write goes through (tests inject faults here)."""
    return open(path, "wb")  # noqa: SIM115 (closed by the caller)


def write_bytes(path: Path | str, data: bytes, what: str = "") -> Path:
    """Write ``data`` to ``path`` atomically (temporary sibling, fsync, rename); faults as ``RunError``."""
    path = Path(path)
    with write_errors(path, what, len(data)):
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        try:
            with _open_for_write(Path(tmp)) as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return path


def write_text(path: Path | str, text: str, what: str = "") -> Path:
    return write_bytes(path, text.encode(), what)


def write_json(path: Path | str, data: Any, what: str = "") -> Path:
    return write_text(path, json.dumps(data, indent=2) + "\n", what)


# Destinations -----------------------------------------------------------------------------------


def check_folder_arg(path: Path | str, what: str) -> Path:
    """``path`` must be a folder or not exist yet (then its nearest existing parent must be a folder)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise MoekitError(f"{what} {path} is a file, not a folder; choose a folder (new or moekit's own)")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise MoekitError(f"{what} {path}: {parent} is a file, not a folder")
    return path


def check_file_arg(path: Path | str, what: str) -> Path:
    """``path`` will be written as a file: it must not be a folder and its folder must exist."""
    path = Path(path)
    if path.is_dir():
        raise MoekitError(f"{what} {path} is a folder; give a file name")
    if not path.parent.is_dir():
        raise MoekitError(f"{what} {path}: folder {path.parent} does not exist")
    return path


def read_owned(folder: Path) -> tuple[str | None, set[str]]:
    """The kind of a folder moekit wrote and the names it wrote there; (None, {}) if it holds no record."""
    try:
        data = json.loads((Path(folder) / OWNED_FILE).read_text())
        kind, files = data["kind"], data["files"]
        if isinstance(kind, str) and isinstance(files, list) and all(isinstance(f, str) for f in files):
            return kind, {f for f in files if "/" not in f and f not in ("", ".", "..")}
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None, set()


def record_owned(folder: Path, kind: str, names: Iterable[str], *, replace: bool = False) -> None:
    """Add ``names`` (files or folders directly in ``folder``) to the record of what moekit wrote."""
    old_kind, old = read_owned(folder)
    files = set(names) if replace or old_kind not in (None, kind) else old | set(names)
    write_json(Path(folder) / OWNED_FILE, {"kind": kind, "files": sorted(files)}, "moekit's file record")


def user_entries(folder: Path) -> list[str]:
    """Names in ``folder`` that are not moekit's bookkeeping files (sorted; [] if it does not exist)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.name not in BOOKKEEPING)


def foreign_entries(folder: Path, kind: str | None = None) -> list[str]:
    """Entries of ``folder`` that moekit did not write (all of them if it was written as another kind)."""
    rec_kind, owned = read_owned(folder)
    if kind is not None and rec_kind not in (None, kind):
        owned = set()
    return [n for n in user_entries(folder) if n not in owned]


def listing(names: list[str], limit: int = 4) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def is_moekit_file(path: Path) -> bool:
    """A single file moekit wrote: a PNG with its ``Software`` tag, or a JSON list of bench (or bench --ep) rows."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError:
        return False
    if head.startswith(b"\x89PNG"):
        return b"Software\x00" + PNG_SOFTWARE.encode() in head
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return False
    rows = ("moekit_ms", "a2a_bytes_per_layer")  # a row of ``bench`` or of ``bench --ep``
    return isinstance(data, list) and all(isinstance(r, dict) and any(k in r for k in rows) for r in data)


def check_may_replace_file(path: Path | str, what: str) -> Path:
    """A single-file destination: new, or a file moekit wrote (by its folder's record or its content);
    anything else is refused."""
    path = check_file_arg(path, what)
    if path.exists() and path.name not in read_owned(path.parent)[1] and not is_moekit_file(path):
        raise MoekitError(f"{what} {path} exists and was not written by moekit; refusing to replace it")
    return path


def save_png(fig: Any, path: Path | str, dpi: int, what: str = "plot") -> Path:
    """Write a matplotlib figure as a PNG tagged ``Software: moekit``, replacing only moekit's own PNGs."""
    path = check_may_replace_file(path, what)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, metadata={"Software": PNG_SOFTWARE})
    return write_bytes(path, buf.getvalue(), what)


# Locks ------------------------------------------------------------------------------------------


@contextmanager
def folder_lock(folder: Path, what: str = "folder") -> Iterator[None]:
    """Hold an exclusive lock on ``folder`` (``.moekit.lock``); a second holder is refused at once.

    NOTE: ``flock`` locks belong to the open file, so two opens in one process also exclude each
    other (the tests rely on this), and the kernel releases the lock when the process dies: a
    killed run never leaves a stale lock behind.
    """
    path = Path(folder) / LOCK_FILE
    with write_errors(path, "lock file"):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            raise MoekitError(
                f"{what} {folder} is being written by another moekit process (pid {holder}); "
                "wait for it to finish or choose another folder"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def check_unlocked(folder: Path, what: str = "folder") -> None:
    """Refuse ``folder`` at once if a process holds its lock (``folder_lock``); take nothing.

    NOTE: a shared lock, opened read-only and never written: every rank of a torchrun launch may
    check the same folder at once without refusing each other (an exclusive probe would)."""
    path = Path(folder) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # no lock file: nobody holds it
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            raise MoekitError(
                f"{what} {folder} is being written by another moekit process (pid {holder}); "
                "wait for it to finish or choose another folder"
            ) from None
    finally:
        os.close(fd)


__all__ = [
    "LOCK_FILE",
    "OWNED_FILE",
    "PNG_SOFTWARE",
    "check_file_arg",
    "check_folder_arg",
    "check_unlocked",
    "check_may_replace_file",
    "folder_lock",
    "foreign_entries",
    "is_moekit_file",
    "listing",
    "read_owned",
    "save_png",
    "record_owned",
    "user_entries",
    "write_bytes",
    "write_errors",
    "write_fault",
    "write_json",
    "write_text",
]
