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

# NOTE: when the experts run on worker threads. The loop can split the experts into
# ``torch.get_num_threads()`` contiguous groups of about equal rows, each run by a worker thread
# whose torch ops are single-threaded (ops release the GIL; workers write disjoint weight-gradient
# slices and each has its own ``[T, D]`` accumulator, summed once at the end), or run them all in
# the calling thread, each matmul split by torch's intra-op threads. Which wins depends on the size
# of the whole call, because libgomp's default wait policy spins: after each parallel region of the
# calling thread its OpenMP team keeps a core busy for a few milliseconds (GOMP_SPINCOUNT), which
# the workers then share. Measured on 2 idle cores, one MoE layer forward+backward, interleaved,
# medians of 15 (workers / calling thread):
#   1024 tokens, D 256, 16 experts x 128, top-4 (0.13 G rows x width x D):  38 / 24 ms
#   1024 tokens, D 256, 64 experts x 64, top-8 (0.13 G):                    50 / 44 ms
#   2048 tokens, D 512, 64 experts x 192, top-8 (1.6 G):                   240 / 272 ms
# With OMP_WAIT_POLICY=passive the workers won at every size, but every other op of a training step
# (one OpenMP region each) then pays a futex wake: the small layer inline took 54 ms instead of 23.
# So, on more than one thread:
# - big experts (mean rows x width >= ``_BIG_EXPERT``, e.g. Mixtral's 512 rows x 14336): the calling
#   thread; intra-op threads split each large matmul well (hidden 1024, Mixtral-like at 2048 tokens:
#   0.94x dense inline, 1.23x on workers);
# - small experts with few rows each (< ``_FEW_ROWS``, e.g. 64 tokens x top-8 over 256 experts: two
#   rows each): workers; matmuls of a few rows are too small for intra-op threads to split at all;
# - otherwise workers only for calls of at least ``_WORKERS_FROM`` rows x width x D, where the spin
#   is paid back (the table above).
# On one thread (what a busy machine gets, see ``moekit.runtime``) it is always the calling thread.
_BIG_EXPERT = 2**18
_FEW_ROWS = 32
_WORKERS_FROM = 2**29


def _use_workers(counts: list[int], n_experts: int, ffn: int, d_model: int) -> bool:
    """Whether the non-empty experts (``n_experts`` of them, ``counts`` rows) go to workers (the NOTE above)."""
    rows = sum(counts)
    mean_rows = rows / n_experts
    if mean_rows * ffn >= _BIG_EXPERT:
        return False
    return mean_rows < _FEW_ROWS or rows * ffn * d_model >= _WORKERS_FROM


_pools: dict[int, ThreadPoolExecutor] = {}
_pools_lock = threading.Lock()
_threads_override: int | None = None


@contextlib.contextmanager
def expert_threads(n: int | None):
    """Run the fused CPU loop on ``n`` worker threads inside the block (1: in the calling thread
    with torch's own intra-op threads; None, the default: ``torch.get_num_threads()`` workers where
    they pay, see the NOTE above)."""
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
    run: Callable[[list, Tensor | None], None], counts: list[int], ffn: int, acc_TD: Tensor | None, *rows_N
) -> Tensor | None:
    """Call ``run(experts, acc)`` on groups of the non-empty experts and return ``acc`` summed.

    ``experts`` lists ``(e, *[rows of expert e in each of rows_N])`` (None stays None). Off the CPU,
    with one thread, or where workers would not pay (``_use_workers``: rows, ``ffn`` the expert width,
    the width of ``acc``), it is one call in this thread; otherwise one call per worker, each with
    its own zeroed copy of ``acc`` to accumulate into.
    """
    parts = [(None,) * len(counts) if r is None else r.split(counts) for r in rows_N]
    experts = [(e, *(p[e] for p in parts)) for e, n in enumerate(counts) if n]
    n_groups = 1
    if rows_N[0].device.type == "cpu" and experts:
        d_model = acc_TD.shape[-1] if acc_TD is not None else 0
        workers = _use_workers(counts, len(experts), ffn, d_model)
        threads = _threads_override or (torch.get_num_threads() if workers else 1)
        n_groups = min(threads, len(experts))
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
