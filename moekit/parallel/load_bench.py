"""``moekit bench --load-sharded N``: peak memory of loading a checkpoint in one process against
each of N processes loading its shard (``load_sharded``), on this machine.

A Mixtral-like Hugging Face checkpoint (hub layout, one file per ~100 MB) is written to a temporary
folder; then, in fresh processes (spawned, gloo on 127.0.0.1): one process runs ``from_pretrained``,
N processes ``load_sharded`` with whole experts (``ep N``) and with sliced experts (``etp N``).
Each process reports its resident-memory high-water mark (``VmHWM``) minus its resident
memory just before loading (torch and moekit imported), the bytes it read from the files and the
bytes of parameters it holds.

NOTE: the high-water mark counts the file pages a process touched (safetensors memory-maps the
files) as well as the tensors it built, so a loader that reads a tensor holds it twice for a
moment; a sharded loader touches only its own experts' pages.
"""

from __future__ import annotations

import json
import socket
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moekit.config import AttentionConfig, ModelConfig, MoEConfig


@dataclass
class LoadBenchRow:
    processes: int
    layout: dict[str, int] | None  # None: from_pretrained in one process
    checkpoint_mib: float  # every tensor of the checkpoint
    held_mib: float  # parameters this rank holds (the max over ranks)
    read_mib: float  # tensor bytes read from the files (max over ranks)
    peak_mib: float  # resident high-water mark minus resident memory before loading (max over ranks)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def bench_config(quick: bool) -> ModelConfig:
    d, f, layers = (128, 256, 2) if quick else (1024, 2048, 2)
    return ModelConfig(
        vocab_size=1024,
        d_model=d,
        n_layers=layers,
        attention=AttentionConfig(n_heads=8, n_kv_heads=2),
        dense_ffn_dim=f,
        moe=MoEConfig(n_routed_experts=8, top_k=2, expert_ffn_dim=f),
        norm_eps=1e-5,
        name="bench-load",
    )


def _status_mib(field: str) -> float:
    """``VmRSS`` (resident now) or ``VmHWM`` (its high-water mark) of this process, in MiB.

    NOTE: not ``getrusage``'s ``ru_maxrss``: Linux carries it across ``exec``, so a spawned child
    would report its parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"/proc/self/status has no {field}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, folder: str, layout: dict | None, out: str) -> None:
    from moekit.interop.pretrained import from_pretrained
    from moekit.parallel import Layout, load_sharded, rank_parameters

    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    before = _status_mib("VmRSS")
    if layout is None:
        model = from_pretrained(folder)
        read = sum(p.numel() * p.element_size() for p in model.state_dict().values())
    else:
        model = load_sharded(folder, Layout(**layout))
        read = model.load_report.bytes_read
    peak = _status_mib("VmHWM") - before
    stats = torch.tensor([rank_parameters(model)["bytes"] / 2**20, read / 2**20, peak], dtype=torch.float64)
    if world > 1:
        dist.all_reduce(stats, op=dist.ReduceOp.MAX)
    if rank == 0:
        Path(out).write_text(json.dumps([float(x) for x in stats]))
    if world > 1:
        dist.destroy_process_group()


def run_load_bench(n: int, quick: bool = False) -> list[LoadBenchRow]:
    """One process against ``n`` processes at ``ep n`` and at ``etp n``."""
    from moekit.interop.pretrained import read_tensors, save_pretrained
    from moekit.models.transformer import MoETransformer
    from moekit.parallel import Layout

    cfg = bench_config(quick)
    Layout(dp=n, ep=n).validate(n, cfg.moe.n_routed_experts, cfg.moe.expert_ffn_dim)
    Layout(dp=1, etp=n).validate(n, cfg.moe.n_routed_experts, cfg.moe.expert_ffn_dim)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "checkpoint"
        torch.manual_seed(0)
        save_pretrained(MoETransformer(cfg), folder, max_shard_size="100MB")
        total = sum(t.numel() * t.element_size() for t in read_tensors(folder, meta=True).values()) / 2**20
        runs = [(1, None), (n, Layout(dp=n, ep=n).to_dict()), (n, Layout(dp=1, etp=n).to_dict())]
        for i, (world, layout) in enumerate(runs):
            out = str(Path(tmp) / f"run{i}.json")
            mp.start_processes(
                _worker, args=(world, _free_port(), str(folder), layout, out), nprocs=world, start_method="spawn"
            )
            held, read, peak = json.loads(Path(out).read_text())
            rows.append(LoadBenchRow(world, layout, total, held, read, peak))
    return rows


def format_report(rows: list[LoadBenchRow]) -> str:
    lines = ["processes  layout         checkpoint MiB  held MiB/rank  read MiB/rank  peak MiB/rank  peak / 1 process"]
    base = rows[0].peak_mib
    for r in rows:
        lay = "one process" if r.layout is None else ("ep " if r.layout["ep"] > 1 else "etp ") + str(r.processes)
        lines.append(
            f"{r.processes:9d}  {lay:<13}  {r.checkpoint_mib:14.1f}  {r.held_mib:13.1f}  {r.read_mib:13.1f}  "
            f"{r.peak_mib:13.1f}  {r.peak_mib / base:16.2f}"
        )
    lines.append(
        "NOTE: peak = resident high-water mark minus resident memory before loading; it counts the file pages "
        "a process touched (memory-mapped) as well as the tensors it built."
    )
    return "\n".join(lines)
