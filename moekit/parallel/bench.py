"""``moekit bench --ep N``: a training step at 1 process and at N expert-parallel processes (gloo,
this machine), with each MoE layer's all-to-all bytes and time.

Each run spawns its processes (torch.multiprocessing, a TCP store on 127.0.0.1) and times full
steps (forward, backward, gradient sync, AdamW) of the same global batch; every process takes
``cores / processes`` threads. The all-to-all figures are forward exchanges (backward sends as many
bytes again), per layer, averaged over steps: bytes this rank sent to other ranks, and seconds.

NOTE: N processes on fewer than N cores (or N x threads > cores) only measure oversubscription,
not a speed-up: the report says how many cores it had.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moekit.config import AttentionConfig, ConfigError, ModelConfig, MoEConfig
from moekit.parallel.layout import Layout


@dataclass
class EPBenchResult:
    processes: int
    layout: dict[str, int]
    threads_per_process: int
    cores: int
    step_ms: float  # median over timed steps, slowest rank
    tokens_per_s: float
    a2a_bytes_per_layer: list[float]  # forward bytes sent to other ranks per step, rank mean
    a2a_ms_per_layer: list[float]  # forward exchange time per step, slowest rank

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def bench_config(quick: bool) -> tuple[ModelConfig, int, int]:
    """A DeepSeekMoE-like model (1 shared + 16 routed experts, top-4) and the global batch (B, S)."""
    d, experts, ffn, layers, batch, seq = (64, 8, 32, 2, 4, 32) if quick else (256, 16, 128, 4, 8, 128)
    cfg = ModelConfig(
        vocab_size=4096,
        d_model=d,
        n_layers=layers,
        dense_ffn_dim=4 * d,
        attention=AttentionConfig(n_heads=4),
        moe=MoEConfig(n_routed_experts=experts, top_k=4, expert_ffn_dim=ffn, n_shared_experts=1, aux_loss_coef=0.01),
        name="bench-ep",
    )
    return cfg, batch, seq


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, quick: bool, steps: int, result_path: str, threads: int | None) -> None:
    from moekit.balancing import balance_terms
    from moekit.models.transformer import MoETransformer
    from moekit.parallel import all_reduce_sum, parallelize, sync_gradients
    from moekit.parallel.expert_parallel import AllToAllDispatcher

    threads = threads or max(1, cores() // world)
    torch.set_num_threads(threads)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    cfg, batch, seq = bench_config(quick)
    torch.manual_seed(0)
    model = MoETransformer(cfg)
    layout = Layout(dp=world, ep=world)
    if world > 1:
        model = parallelize(model, layout)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(1))
    b = batch // world
    ids = ids[rank * b : (rank + 1) * b]
    dispatchers = [
        m.dispatcher for m in model.modules() if isinstance(getattr(m, "dispatcher", None), AllToAllDispatcher)
    ]
    times, a2a_bytes, a2a_s = [], [0.0] * len(dispatchers), [0.0] * len(dispatchers)
    reduce = all_reduce_sum if world > 1 else None
    for step in range(steps + 2):  # two warm-up steps
        for d in dispatchers:
            d.stats.reset()
        if world > 1:
            dist.barrier()
        t0 = time.perf_counter()
        out = model(ids, labels=ids)
        loss = out.loss + sum(balance_terms(out.routing, cfg.moe, reduce).values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        sync_gradients(model)
        opt.step()
        elapsed = time.perf_counter() - t0
        if step >= 2:
            times.append(elapsed)
            for i, d in enumerate(dispatchers):
                a2a_bytes[i] += d.stats.bytes_sent / steps
                a2a_s[i] += d.stats.seconds / steps
    t = torch.tensor([statistics.median(times), *a2a_s], dtype=torch.float64)
    nbytes = torch.tensor(a2a_bytes, dtype=torch.float64)
    if world > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        dist.all_reduce(nbytes)
        nbytes /= world
    if rank == 0:
        result = EPBenchResult(
            processes=world,
            layout=layout.to_dict(),
            threads_per_process=threads,
            cores=cores(),
            step_ms=float(t[0]) * 1e3,
            tokens_per_s=batch * seq / float(t[0]),
            a2a_bytes_per_layer=[float(x) for x in nbytes],
            a2a_ms_per_layer=[float(x) * 1e3 for x in t[1:]],
        )
        Path(result_path).write_text(json.dumps(result.to_dict()))
    if world > 1:
        dist.destroy_process_group()


def run_ep_bench(ep: int, steps: int = 5, quick: bool = False, threads: int | None = None) -> list[EPBenchResult]:
    """Time the same global batch at 1 process and at ``ep`` expert-parallel processes, each with
    ``threads`` threads (default: the cores shared out among the processes)."""
    cfg, batch, _ = bench_config(quick)
    Layout(dp=ep, ep=ep).validate(ep, cfg.moe.n_routed_experts, cfg.moe.expert_ffn_dim)
    if batch % ep:
        raise ConfigError(f"--ep {ep} must divide the benchmark's batch of {batch} sequences")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for world in sorted({1, ep}):
            out = str(Path(tmp) / f"world{world}.json")
            mp.start_processes(
                _worker, args=(world, _free_port(), quick, steps, out, threads), nprocs=world, start_method="spawn"
            )
            results.append(EPBenchResult(**json.loads(Path(out).read_text())))
    return results


def format_report(results: list[EPBenchResult]) -> str:
    """A plain-text table plus the caveat about cores."""
    lines = ["processes  threads/proc  step ms  tokens/s  a2a KiB/layer (fwd, sent)  a2a ms/layer (fwd)"]
    for r in results:
        kib = " ".join(f"{b / 1024:.0f}" for b in r.a2a_bytes_per_layer) or "-"
        ms = " ".join(f"{t:.1f}" for t in r.a2a_ms_per_layer) or "-"
        lines.append(
            f"{r.processes:9d}  {r.threads_per_process:12d}  {r.step_ms:7.1f}  {r.tokens_per_s:8.0f}  {kib:>25}  {ms:>18}"
        )
    base, last = results[0], results[-1]
    if len(results) > 1:
        lines.append(f"step time {last.processes} processes / 1 process: {last.step_ms / base.step_ms:.2f}")
    if base.threads_per_process != last.threads_per_process:
        lines.append(
            f"NOTE: 1 process ran {base.threads_per_process} threads, {last.processes} ran "
            f"{last.threads_per_process} each; on a busy machine OpenMP threads can spin against each other "
            "(10-50x slower), so compare with --threads 1 too."
        )
    if last.processes > last.cores or last.processes * last.threads_per_process > last.cores:
        lines.append(
            f"NOTE: {last.processes} processes on {last.cores} cores measure oversubscription, not a speed-up."
        )
    else:
        lines.append(
            f"NOTE: {last.cores} cores shared by every process: this measures communication and splitting costs "
            "on one machine, not what separate devices would gain."
        )
    return "\n".join(lines)
