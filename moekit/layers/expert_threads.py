"""CPU worker threads for the fused experts loop: a pool of single-threaded workers, each given a
contiguous group of experts of about equal rows, and ``expert_threads`` to choose their number.

Moved out of ``moekit.layers.experts`` (which re-exports these names) so that module holds the
experts and the ways to compute them, this one the thread runtime.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor

# NOTE: history and why the pool is off by default. The loop once split the experts of small
# matmuls into ``torch.get_num_threads()`` groups on single-threaded workers (each op forking and
# joining the OpenMP team looked wasteful for tens of rows). Measured again on 2 idle cores (one MoE
# layer, 1024 tokens, D 256, forward+backward, median of 20): Qwen3-MoE-like 16 x 128 top-4: 35 ms on
# 2 workers, 23 ms in the calling thread with 2 intra-op threads, 38 ms on 1 thread;
# DeepSeek-V3-like 64 x 64 top-8: 46, 35 and 46 ms. The workers ran no faster than one thread because
# libgomp's default wait policy spins: after each parallel region of the calling thread its OpenMP
# team keeps a core busy for milliseconds (GOMP_SPINCOUNT), which the workers then share. With
# OMP_WAIT_POLICY=passive the workers ran 23 and 30 ms, but every other op of the step (one OpenMP
# region each) then pays a futex wake: the same inline layer took 54 ms. So the default is the
# calling thread with torch's own threads (which ``moekit.runtime`` sizes to the free cores); the
# workers run only inside ``expert_threads(n)`` with n > 1.
_pools: dict[int, ThreadPoolExecutor] = {}
_pools_lock = threading.Lock()
_threads_override: int | None = None


@contextlib.contextmanager
def expert_threads(n: int | None):
    """Run the fused CPU loop on ``n`` worker threads inside the block (1 or None, the default: in
    the calling thread with torch's own intra-op threads; see the NOTE above)."""
    global _threads_override
    if n is not None and n < 1:
        raise ValueError(f"expert_threads needs n >= 1 or None, got {n}")
    previous, _threads_override = _threads_override, n
    try:
        yield
    finally:
        _threads_override = previous


def worker_count() -> int:
    """Threads the experts loops may use: ``expert_threads``' override, else torch's thread count."""
    return _threads_override or torch.get_num_threads()


def _single_threaded_worker() -> None:
    torch.get_num_threads()  # run torch's lazy per-thread setup now, so it cannot undo the next line
    torch.set_num_threads(1)  # this thread's OpenMP and MKL thread counts (plus a default, restored below)


def _workers(n: int) -> ThreadPoolExecutor:
    """``n`` started worker threads whose torch ops use one thread each (created once, then reused)."""
    with _pools_lock:
        if n not in _pools:
            threads = torch.get_num_threads()
            pool = ThreadPoolExecutor(n, thread_name_prefix="moekit-experts", initializer=_single_threaded_worker)
            started = threading.Barrier(n + 1)
            futures = [pool.submit(started.wait) for _ in range(n)]  # each blocks one thread: n start
            started.wait()
            for f in futures:
                f.result()
            torch.set_num_threads(threads)  # restore the process default the workers overwrote
            _pools[n] = pool
        return _pools[n]


def _forget_workers() -> None:
    global _pools_lock
    _pools.clear()  # a forked child inherits the executors but none of their threads
    _pools_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_workers)


def _map_experts(
    run: Callable[[list, Tensor | None], None], counts: list[int], acc_TD: Tensor | None, *rows_N
) -> Tensor | None:
    """Call ``run(experts, acc)`` on groups of the non-empty experts and return ``acc`` summed.

    ``experts`` lists ``(e, *[rows of expert e in each of rows_N])`` (None stays None). Off the CPU,
    outside ``expert_threads(n > 1)`` it is one call in this thread; inside, one call per worker,
    each with its own zeroed copy of ``acc`` to accumulate into.
    """
    parts = [(None,) * len(counts) if r is None else r.split(counts) for r in rows_N]
    experts = [(e, *(p[e] for p in parts)) for e, n in enumerate(counts) if n]
    n_groups = 1
    if rows_N[0].device.type == "cpu" and experts and _threads_override:
        n_groups = min(_threads_override, len(experts))
    if n_groups <= 1:
        run(experts, acc_TD)
        return acc_TD
    groups = _balanced_groups(experts, [n for n in counts if n], n_groups)
    accs = [acc_TD] + [None if acc_TD is None else torch.zeros_like(acc_TD) for _ in groups[1:]]
    pool = _workers(n_groups)
    futures = [pool.submit(_no_grad_call, run, group, acc) for group, acc in zip(groups, accs, strict=True)]
    for f in futures:
        f.result()
    if acc_TD is not None:
        for acc in accs[1:]:
            acc_TD += acc
    return acc_TD


def _no_grad_call(run: Callable, *args) -> None:
    with torch.no_grad():  # grad mode is per thread; inside the Function nothing is recorded
        run(*args)


def _balanced_groups(items: list, sizes: list[int], n: int) -> list[list]:
    """Split ``items`` into at most ``n`` contiguous non-empty groups of about equal total size."""
    total, groups, current, acc = sum(sizes), [], [], 0
    for i, (item, size) in enumerate(zip(items, sizes, strict=True)):
        current.append(item)
        acc += size
        remaining_items, remaining_groups = len(items) - i - 1, n - len(groups) - 1
        if remaining_groups and (acc * n >= total * (len(groups) + 1) or remaining_items == remaining_groups):
            groups.append(current)
            current = []
    if current:
        groups.append(current)
    return groups
