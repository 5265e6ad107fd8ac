"""Launching gloo process groups for the parallel tests: ``torchrun`` as a subprocess."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def torchrun(world: int, args: list[str], timeout: float = 300, **env) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node world ARGS``; on a timeout the whole process group
    (launcher and workers) is killed, so a hang fails the test instead of leaving processes behind."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore", **env}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(world), *args]
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"torchrun {args} hung for {timeout} s:\n{err[-3000:]}") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@pytest.fixture(scope="session", name="torchrun")
def torchrun_fixture():
    """``torchrun(world, args, timeout=300, **env) -> CompletedProcess``."""
    return torchrun
