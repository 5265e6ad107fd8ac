"""moekit.files and moekit.atomic: atomic writes that fail in one line, ownership records, locks."""

from __future__ import annotations

import errno

import pytest

from moekit import files
from moekit.atomic import atomic_folder
from moekit.errors import MoekitError, RunError


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    f = files.write_text(tmp_path / "a.json", "old")
    monkeypatch.setattr(files, "_open_for_write", lambda p: open("/dev/full", "wb"))  # noqa: SIM115
    with pytest.raises(
        RunError, match=r"no space left on device writing results .*a.json \(needs about 3 B; .* free\)"
    ):
        files.write_text(f, "new", "results")
    assert f.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_permission_denied_is_named(tmp_path, monkeypatch):
    def denied(path):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(files, "_open_for_write", denied)
    with pytest.raises(RunError, match="cannot write config .*: Permission denied"):
        files.write_text(tmp_path / "c.json", "{}", "config")


def test_ownership_record_merges_and_ignores_hostile_names(tmp_path):
    files.record_owned(tmp_path, "run", ["a", "b"])
    files.record_owned(tmp_path, "run", ["c"])
    assert files.read_owned(tmp_path) == ("run", {"a", "b", "c"})
    (tmp_path / files.OWNED_FILE).write_text('{"kind": "run", "files": ["../x", "/etc", "ok"]}')
    assert files.read_owned(tmp_path) == ("run", {"ok"})
    (tmp_path / files.OWNED_FILE).write_text("not json")
    assert files.read_owned(tmp_path) == (None, set())
    (tmp_path / "mine.txt").write_text("x")
    assert files.foreign_entries(tmp_path) == ["mine.txt"]


def test_lock_refuses_a_second_holder_until_released(tmp_path):
    with files.folder_lock(tmp_path, "run directory"):
        with pytest.raises(MoekitError, match=r"being written by another moekit process \(pid \d+\)"):
            with files.folder_lock(tmp_path, "run directory"):
                pass
    with files.folder_lock(tmp_path):  # released
        pass


def test_check_unlocked_refuses_a_held_lock_but_not_other_checkers(tmp_path):
    import fcntl
    import os

    files.check_unlocked(tmp_path)  # no lock file
    with files.folder_lock(tmp_path, "run directory"):
        with pytest.raises(MoekitError, match=r"being written by another moekit process \(pid \d+\)"):
            files.check_unlocked(tmp_path, "run directory")
    pid = (tmp_path / files.LOCK_FILE).read_text()
    # Another rank checking at the same moment (a shared lock held) does not refuse this one,
    # and checking never writes the lock file (an exclusive probe truncated it: "pid ?").
    fd = os.open(tmp_path / files.LOCK_FILE, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        files.check_unlocked(tmp_path)
        with pytest.raises(MoekitError, match="being written by another"):
            with files.folder_lock(tmp_path):
                pass
    finally:
        os.close(fd)
    assert (tmp_path / files.LOCK_FILE).read_text() == pid


def test_png_signature(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure()
    files.save_png(fig, tmp_path / "p.png", dpi=20)
    plt.close(fig)
    assert files.is_moekit_file(tmp_path / "p.png")
    fig = plt.figure()
    fig.savefig(tmp_path / "user.png", dpi=20)
    plt.close(fig)
    assert not files.is_moekit_file(tmp_path / "user.png")
    with pytest.raises(MoekitError, match="was not written by moekit"):
        files.check_may_replace_file(tmp_path / "user.png", "--plot")


def test_atomic_folder_carries_the_users_files(tmp_path):
    dst = tmp_path / "d"
    dst.mkdir()
    (dst / "README.md").write_text("mine")
    (dst / "sub").mkdir()
    (dst / "sub" / "x").write_text("deep")
    (dst / "old.bin").write_text("replaced")
    inode = (dst / "README.md").stat().st_ino
    with atomic_folder(dst, carry=["README.md", "sub"]) as tmp:
        (tmp / "new.bin").write_text("new")
    assert sorted(p.name for p in dst.iterdir()) == ["README.md", "new.bin", "sub"]
    assert (dst / "README.md").stat().st_ino == inode  # the same file, hard-linked, not a copy
    assert (dst / "sub" / "x").read_text() == "deep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_a_file_in_moekits_record_may_be_replaced(tmp_path):
    (tmp_path / "loss.png").write_bytes(b"\x89PNG an older moekit's plot, untagged")
    with pytest.raises(MoekitError):
        files.check_may_replace_file(tmp_path / "loss.png", "plot")
    files.record_owned(tmp_path, "run", ["loss.png"])
    assert files.check_may_replace_file(tmp_path / "loss.png", "plot") == tmp_path / "loss.png"
