"""Fixtures for CLI tests: a private cache, one thread, and a small world of user files to protect."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True, scope="session")
def _cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MOEKIT_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "moekit-cache-cli"))
        yield
