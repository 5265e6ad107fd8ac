"""``moekit quickstart``: train a tiny DeepSeekMoE on this Python's standard library in about two
minutes of CPU, then show what it costs (accounting), what it learned (validation loss, plots)
and what it writes (a sample). It ends with its own wall time, which it also appends to the run's
``train.log`` and records in ``summary.json`` (``quickstart_wall_s``): the README quotes it."""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

from moekit.accounting import account
from moekit.cli.args import add_threads_option, positive_int, with_threads
from moekit.files import write_errors, write_json
from moekit.presets import get_preset
from moekit.runtime import applied, follow_load
from moekit.training.config import RunConfig, TrainConfig
from moekit.training.data import stdlib_source
from moekit.training.loop import load_run, train
from moekit.training.plots import plot_run
from moekit.training.progress import RichProgress
from moekit.training.run_dir import SUMMARY_FILE, TRAIN_LOG

PRESET = "tiny"
# Published models whose cost the demo prints first: the numbers people most often get wrong.
SHOWCASE = ["mixtral-8x7b", "deepseek-moe-16b", "qwen1.5-moe-a2.7b", "deepseek-v3"]
PROMPT = "import os\n\n\ndef "
# ~2 minutes on a 2-core CPU: measured 0.3-0.5 s per step of 8 x 128 tokens (plus ~20 s to train
# the BPE tokenizer on first use). NOTE: on a busy machine two OpenMP threads can be ~40x slower
# than one for minutes at a time, so the threads follow the free cores (moekit.runtime).
DEFAULT_STEPS = 250


def quickstart_config(steps: int) -> RunConfig:
    """The tiny DeepSeekMoE preset with short sequences and a learning rate for a short run."""
    return RunConfig(
        get_preset(PRESET),
        TrainConfig(
            steps=steps,
            batch_size=8,
            seq_len=128,
            lr=3e-3,
            warmup_steps=10,
            log_every=5,
            eval_every=50,
            eval_batches=4,
            ckpt_every=125,
            keep_checkpoints=1,
        ),
    )


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "quickstart",
        help="train a tiny DeepSeekMoE for ~2 minutes on CPU and show what it learned",
        description="Train the 'tiny' DeepSeekMoE preset on this Python's standard library sources "
        "(BPE tokenizer trained and cached on first use), then print its accounting, validation loss, "
        "plots and a generated sample. Running it again continues the same run.",
    )
    p.add_argument(
        "--steps", type=positive_int, default=DEFAULT_STEPS, help=f"training steps (default {DEFAULT_STEPS})"
    )
    p.add_argument("--out", default="runs/quickstart", help="run directory (default runs/quickstart)")
    p.add_argument("--force", action="store_true", help="start over instead of continuing a previous quickstart")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    add_threads_option(p)
    p.set_defaults(func=with_threads(run))


def print_showcase() -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="What published MoE models cost (moekit params NAME for the full breakdown)")
    for col in ("model", "total", "active", "active share", "experts (routed top-k + shared)"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for name in SHOWCASE:
        cfg = get_preset(name)
        p = account(cfg).params
        moe = cfg.moe
        assert moe is not None
        table.add_row(
            name,
            f"{p.total / 1e9:.1f}B",
            f"{p.active / 1e9:.1f}B",
            f"{p.active / p.total:.0%}",
            f"{moe.n_routed_experts} top-{moe.top_k} + {moe.n_shared_experts}",
        )
    Console().print(table)


def print_routing(model: torch.nn.Module, tokenizer, ids: torch.Tensor, n_tokens: int = 8) -> None:
    """Which routed experts each of the first tokens used, layer by layer."""
    with torch.no_grad():
        out = model(ids[:, :n_tokens])
    print(f"  experts chosen per token (MoE layers {out.moe_layer_ids}; shared experts see every token):")
    for t in range(min(n_tokens, ids.shape[1])):
        piece = tokenizer.decode([int(ids[0, t])])
        chosen = " | ".join(",".join(str(e) for e in sorted(r.idx_TK[t].tolist())) for r in out.routing)
        print(f"    {piece!r:>14} -> {chosen}")


def wall_time(seconds: float) -> str:
    """``"1 min 32 s"`` (or ``"48 s"``, ``"1 h 02 min"``): a wall time as people say it."""
    s = round(seconds)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def record_wall_time(run_dir: Path, seconds: float, summary: dict) -> str:
    """The closing line; appended to the run's ``train.log`` and kept in ``summary.json``."""
    seconds = round(seconds, 1)  # the line says what the summary keeps
    line = f"quickstart finished in {wall_time(seconds)}"
    with write_errors(run_dir / TRAIN_LOG, "progress log"), open(run_dir / TRAIN_LOG, "a") as f:
        f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}\n")
    write_json(run_dir / SUMMARY_FILE, {**summary, "quickstart_wall_s": seconds}, "run summary")
    return line


def run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    print_showcase()
    cfg = quickstart_config(args.steps)
    moe = cfg.model.moe
    assert moe is not None
    print(
        f"Training a tiny DeepSeekMoE (preset {PRESET!r}: {moe.n_shared_experts} shared + {moe.n_routed_experts} "
        f"routed experts, top-{moe.top_k}) on {stdlib_source()} for {args.steps} steps."
    )
    report = account(cfg.model, seq_len=cfg.train.seq_len)
    p, f = report.params, report.flops
    print(
        f"  parameters: {p.total:,} total, {p.active:,} active per token ({p.active / p.total:.0%}); "
        f"FLOPs/token: {f.forward_per_token:,} forward, {f.train_per_token:,} training (seq {f.seq_len})"
    )
    if (threads := applied()) is not None:
        print(f"  {threads.line}")
    # the same lines as `moekit train`'s; says when the load changes the threads
    progress = RichProgress("quickstart", log=Path(args.out) / TRAIN_LOG, watch=follow_load())
    result = train(cfg, args.out, resume=not args.force, force=args.force, device=args.device, callback=progress)
    if result.interrupted:
        print(f"interrupted at step {result.step}; run `moekit quickstart --out {args.out}` again to continue")
        return 130
    s = result.summary
    assert s is not None
    uniform = math.log(cfg.model.vocab_size)
    print(
        f"  validation loss {s['val_loss']:.3f} nats/token (perplexity {s['val_ppl']:.1f}; a uniform guess over "
        f"{cfg.model.vocab_size} tokens is {uniform:.2f}) after {s['tokens']:,} tokens in {s['train_time_s']:.0f} s"
    )
    if s["max_vio"] is not None:
        print(f"  expert load imbalance MaxVio {s['max_vio']:.2f} (0 = perfectly balanced)")
    for path in plot_run(result.run_dir):
        print(f"  plot: {path}")
    loaded = load_run(result.run_dir, device=args.device)
    ids = torch.tensor([loaded.tokenizer.encode_batch([PROMPT])[0]], device=next(loaded.model.parameters()).device)
    torch.manual_seed(0)
    out = loaded.model.generate(ids, max_new_tokens=60, temperature=0.8, top_k=40)
    print("  sample:\n" + "\n".join("    " + line for line in loaded.tokenizer.decode(out[0].tolist()).splitlines()))
    print_routing(loaded.model, loaded.tokenizer, out)
    print(f"Next: `moekit eval {args.out}`, or a longer run: `moekit train --preset tiny --steps 2000 --out runs/tiny`")
    print(record_wall_time(result.run_dir, time.perf_counter() - start, s))
    return 0
