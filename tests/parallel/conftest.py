"""Launching gloo process groups for the parallel tests: ``torchrun`` as a subprocess."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def torchrun(
    world: int, args: list[str], timeout: float = 300, during: Callable | None = None, **env
) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node world ARGS``; on a timeout the whole process group
    (launcher and workers) is killed, so a hang fails the test instead of leaving processes behind.
    ``during(proc)`` runs while it runs (e.g. to signal one worker)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore", **env}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(world), *args]
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        if during is not None:
            during(proc)
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"torchrun {args} hung for {timeout} s:\n{err[-3000:]}") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def worker_pid(launcher: subprocess.Popen, rank: int, timeout: float = 120) -> int:
    """The pid of torchrun's worker of ``rank`` (a child of the launcher with RANK=rank)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for task in Path(f"/proc/{launcher.pid}/task").iterdir():
            for pid in (task / "children").read_text().split():
                try:
                    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                except OSError:
                    continue
                if f"RANK={rank}".encode() in environ:
                    return int(pid)
        time.sleep(0.1)
    raise AssertionError(f"no worker of rank {rank} appeared")


@pytest.fixture(scope="session", name="torchrun")
def torchrun_fixture():
    """``torchrun(world, args, timeout=300, **env) -> CompletedProcess``."""
    return torchrun


@pytest.fixture(scope="session", name="worker_pid")
def worker_pid_fixture():
    """``worker_pid(launcher, rank) -> pid``."""
    return worker_pid


@pytest.fixture(scope="session", params=[2, 4], ids=["world2", "world4"])
def dist_results(request, tmp_path_factory) -> dict:
    """ONE launch per world size for all of tests/parallel's multi-process cases (a launch costs
    ~25 s at 2 processes, ~45 s at 4): ``{"equivalence": ..., "loading": ...}`` from ``dist_cases.py``,
    plus ``"root"``, the folder ``prepare_loading.py`` wrote (and the launch added to)."""
    from tests.parallel.prepare_loading import prepare

    world = request.param
    root = tmp_path_factory.mktemp(f"dist{world}")
    cache = os.environ.get("MOEKIT_CACHE_DIR")
    os.environ["MOEKIT_CACHE_DIR"] = str(root / "cache")
    try:
        prepare(root, world)
        out = root / "results.json"
        proc = torchrun(world, [str(Path(__file__).parent / "dist_cases.py"), str(out), str(root)], timeout=900)
    finally:
        if cache is None:
            os.environ.pop("MOEKIT_CACHE_DIR")
        else:
            os.environ["MOEKIT_CACHE_DIR"] = cache
    assert proc.returncode == 0, proc.stderr[-5000:]
    return {**json.loads(out.read_text()), "root": str(root), "world": world}
