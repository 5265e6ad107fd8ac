"""Decode speed: moekit's ``generate`` against transformers' ``generate`` on one checkpoint, and the roofline.

A random moekit model is saved as a Hugging Face folder; moekit (``from_pretrained``) and
transformers (``AutoModelForCausalLM``, fp32, sdpa attention) load that same folder. Both decode
greedily from the same prompt, with the same torch threads, interleaved in one process: every
round times moekit and each of transformers' experts implementations ("eager" and "grouped_mm";
"batched_mm" on request) once, in an order rotated every round, so a shared machine's slow spells hit all
alike; medians are reported and the ratio is taken against transformers' fastest (also per round,
``ratio_rounds``: both sides of a round ran under the same load).

Decode tokens/s counts only the decode steps: a streamer stamps the time of each new token, and
``batch * (steps - 1) / (last stamp - first stamp)`` leaves the prompt (prefill) out. Each stamp
holds the wall clock and the process's CPU time (``time.process_time``, every thread): on a
machine shared with other work the wall clock also counts the time the process waited for a core,
which falls on whichever side ran in a busy spell; the CPU-time speed (``*_cpu_tok_s``,
``cpu_ratio_vs_hf``) leaves that wait out. It still includes what other work costs in shared caches
and memory bandwidth, and with several threads it counts OpenMP's spin-waiting as work.

The roofline: at small batch a decode step is bound by reading weights. Bytes per decoded token =
(always-active weights + the routed experts the step actually chose) / batch, from the analytic
accounting (``moekit.accounting.count_params``): everything active except the input embedding,
of which a token reads one row, and except the routed experts, counted as the distinct experts
each MoE layer used in the step (top_k at batch 1; measured from the routing at batch 8). The KV
cache (a few KiB at these lengths) is left out. The read bandwidth is measured here: the median
time of ``torch.sum`` over a 512 MiB fp32 tensor (16x this machine's L3), with the benchmark's
threads. Roofline tokens/s = bandwidth / bytes per token.

Shapes: B batch, T prompt length, N new tokens.
"""

from __future__ import annotations

import dataclasses
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from moekit.accounting import count_params
from moekit.bench_models import DECODE_MODELS, QUICK_DECODE_MODELS
from moekit.config import ModelConfig
from moekit.errors import MoekitError
from moekit.files import save_png
from moekit.side_by_side import (
    DEFAULT_HF_IMPLS,
    HF_EXPERT_IMPLS,
    load_average,
    load_transformers,
    paired_ratios,
    rotated_rounds,
)


@dataclass
class DecodeRow:
    """One (model, batch): decode tokens/s of each side, the ratio and the roofline."""

    model: str
    batch: int
    new_tokens: int
    prompt_tokens: int
    moekit_tok_s: float
    hf_tok_s: dict[str, float]  # per transformers experts implementation
    hf_best_impl: str
    ratio_vs_hf: float  # moekit / transformers' fastest (ratio of the medians)
    ratio_rounds: list[float]  # moekit / transformers' fastest within each round (paired, same conditions)
    moekit_cpu_tok_s: float  # the same, per second of the process's CPU time (waits for a core left out)
    hf_cpu_tok_s: dict[str, float]
    cpu_ratio_vs_hf: float  # moekit / transformers' fastest, both in CPU time
    same_tokens: float  # fraction of new tokens on which moekit and transformers agree (greedy)
    weight_bytes_per_token: float
    always_active_bytes: int  # per decode step: attention, norms, routers, shared, dense, head, one embedding row
    routed_expert_bytes: float  # per decode step: distinct routed experts chosen x their bytes
    distinct_experts_per_layer: float  # mean over MoE layers and steps
    read_gb_s: float
    roofline_tok_s: float
    roofline_fraction: float  # moekit tokens/s / roofline tokens/s
    total_params: int
    active_params: int
    rounds: int
    threads: int
    load_avg_1m: float | None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def read_bandwidth(size_mib: int = 512, repeats: int = 5) -> float:
    """Bytes per second ``torch.sum`` reads from a ``size_mib`` fp32 tensor (median of ``repeats``)."""
    buf = torch.ones(size_mib * 2**20 // 4)
    buf.sum()  # fault the pages in
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        buf.sum()
        times.append(time.perf_counter() - t0)
    return buf.numel() * 4 / statistics.median(times)


def weight_bytes(cfg: ModelConfig, distinct_experts_per_layer: float, itemsize: int = 4) -> tuple[int, float]:
    """(always-active bytes, routed-expert bytes) one decode step reads, from the accounting."""
    p = count_params(cfg)
    by = {c.name: c for c in p.components}
    routed = by["routed_experts"]
    embedding = cfg.vocab_size * cfg.d_model if not cfg.tie_embeddings else 0
    always = p.active - routed.active_value - embedding + cfg.d_model  # a token reads one embedding row
    n_moe = len(cfg.moe_layer_ids)
    return always * itemsize, n_moe * distinct_experts_per_layer * routed.per_copy * itemsize


class _Clock:
    """A streamer that stamps the wall clock and the process's CPU time each time a step's new
    tokens arrive (the prompt put is ignored)."""

    def __init__(self, batch: int):
        self.batch, self.stamps, self.cpu_stamps = batch, [], []

    def put(self, tokens: Tensor) -> None:
        if tokens.numel() == self.batch and (tokens.dim() == 1 or tokens.shape[-1] == 1):
            self.stamps.append(time.perf_counter())
            self.cpu_stamps.append(time.process_time())

    def end(self) -> None:
        pass

    def tokens_per_s(self, cpu: bool = False) -> float:
        """Decode tokens per second of wall clock, or of CPU time (``cpu``)."""
        stamps = self.cpu_stamps if cpu else self.stamps
        if len(stamps) < 2:
            raise MoekitError("decode bench: fewer than 2 new tokens were stamped; raise --new-tokens")
        return self.batch * (len(stamps) - 1) / max(stamps[-1] - stamps[0], 1e-9)


def _distinct_experts(model, prompt_BT: Tensor, new_tokens: int) -> float:
    """Mean distinct routed experts per MoE layer per decode step (hooks on the MoE layers)."""
    seen: list[int] = []
    b = prompt_BT.shape[0]

    def hook(_module, _inputs, output) -> None:
        y, routing = output
        if routing.idx_TK.shape[0] == b:  # a decode step (one token per row), not the prefill
            seen.append(int((routing.counts_E > 0).sum()))

    handles = [blk.ffn.register_forward_hook(hook) for blk in model.layers if blk.is_moe]
    try:
        model.generate(prompt_BT, new_tokens, eos_token_id=[], temperature=0.0)
    finally:
        for h in handles:
            h.remove()
    return sum(seen) / max(len(seen), 1)


def run_decode_bench(
    models: dict[str, Callable[[], ModelConfig]],
    batches: Iterable[int] = (1, 8),
    new_tokens: int = 32,
    prompt_tokens: int = 16,
    rounds: int = 3,
    hf_impls: Iterable[str] = DEFAULT_HF_IMPLS,
    on_progress: Callable[[str], None] | None = None,
    seed: int = 0,
) -> list[DecodeRow]:
    """Time decode for every model x batch (see the module docstring); ``on_progress(label)`` reports."""
    from moekit.interop.pretrained import from_pretrained
    from moekit.models import MoETransformer

    hf_impls, batches = list(hf_impls), list(batches)
    say = on_progress or (lambda _label: None)
    say("measuring read bandwidth")
    bandwidth = read_bandwidth()
    rows = []
    for name, build in models.items():
        cfg = build()
        torch.manual_seed(seed)
        with tempfile.TemporaryDirectory(prefix="moekit-decode-") as folder:
            say(f"{name}: saving a random model as a Hugging Face folder")
            MoETransformer(cfg).save_pretrained(folder, format="hf")
            ours = from_pretrained(folder).eval()
            theirs = load_transformers(folder, "bench --decode").eval()
        counts = count_params(cfg)
        for b in batches:
            prompt_BT = torch.randint(0, cfg.vocab_size, (b, prompt_tokens), generator=torch.Generator().manual_seed(b))
            speeds: dict[str, list[float]] = {"moekit": [], **{impl: [] for impl in hf_impls}}
            cpu_speeds: dict[str, list[float]] = {k: [] for k in speeds}
            outputs: dict[str, Tensor] = {}

            names = list(speeds)
            for which in names:  # warm-up: allocations, lazy initialisation, caches
                say(f"{name} batch {b}: warm-up {which}")
                _decode_once(which, ours, theirs, prompt_BT, new_tokens)
            for r, which in rotated_rounds(names, rounds):
                say(f"{name} batch {b}: round {r + 1}/{rounds} {which}")
                tok_s, cpu_tok_s, outputs[which] = _decode_once(which, ours, theirs, prompt_BT, new_tokens)
                speeds[which].append(tok_s)
                cpu_speeds[which].append(cpu_tok_s)
            med = {k: statistics.median(v) for k, v in speeds.items()}
            cpu_med = {k: statistics.median(v) for k, v in cpu_speeds.items()}
            hf = {k: med[k] for k in hf_impls}
            best = max(hf, key=hf.get)
            same = (outputs["moekit"] == outputs[best]).float().mean().item()
            distinct = _distinct_experts(ours, prompt_BT, min(new_tokens, 8))
            always, routed = weight_bytes(cfg, distinct)
            per_token = (always + routed) / b
            roofline = bandwidth / per_token
            rows.append(
                DecodeRow(
                    model=name,
                    batch=b,
                    new_tokens=new_tokens,
                    prompt_tokens=prompt_tokens,
                    moekit_tok_s=med["moekit"],
                    hf_tok_s=hf,
                    hf_best_impl=best,
                    ratio_vs_hf=med["moekit"] / hf[best],
                    ratio_rounds=paired_ratios(speeds["moekit"], speeds[best]),
                    moekit_cpu_tok_s=cpu_med["moekit"],
                    hf_cpu_tok_s={k: cpu_med[k] for k in hf_impls},
                    cpu_ratio_vs_hf=cpu_med["moekit"] / max(cpu_med[k] for k in hf_impls),
                    same_tokens=same,
                    weight_bytes_per_token=per_token,
                    always_active_bytes=always,
                    routed_expert_bytes=routed,
                    distinct_experts_per_layer=distinct,
                    read_gb_s=bandwidth / 1e9,
                    roofline_tok_s=roofline,
                    roofline_fraction=med["moekit"] / roofline,
                    total_params=counts.total,
                    active_params=counts.active,
                    rounds=rounds,
                    threads=torch.get_num_threads(),
                    load_avg_1m=load_average(),
                )
            )
    return rows


def _decode_once(which: str, ours, theirs, prompt_BT: Tensor, new_tokens: int) -> tuple[float, float, Tensor]:
    """One greedy generation by moekit ("moekit") or transformers (an experts implementation):
    decode tokens/s by wall clock and by CPU time, and the new tokens ``[B, N]``."""
    clock = _Clock(prompt_BT.shape[0])
    with torch.no_grad():
        if which == "moekit":
            out = ours.generate(prompt_BT, new_tokens, eos_token_id=[], temperature=0.0, streamer=clock)
        else:
            theirs.set_experts_implementation(which)
            out = theirs.generate(
                prompt_BT,
                attention_mask=torch.ones_like(prompt_BT),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,  # a random model may emit its end token: decode them all
                do_sample=False,
                streamer=clock,
                pad_token_id=0,
            )
    return clock.tokens_per_s(), clock.tokens_per_s(cpu=True), out[:, prompt_BT.shape[1] :]


def plot_decode(rows: list[DecodeRow], path: str) -> None:
    """Bars of decode tokens/s (moekit, transformers' fastest, the roofline), one group per row."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise MoekitError("--plot needs matplotlib (pip install 'moekit[plot]')") from e
    fig, ax = plt.subplots(figsize=(1.8 + 2.2 * len(rows), 4.5))
    xs = range(len(rows))
    w = 0.27
    ax.bar([i - w for i in xs], [r.moekit_tok_s for r in rows], w, label="moekit")
    ax.bar(list(xs), [r.hf_tok_s[r.hf_best_impl] for r in rows], w, label="transformers (fastest experts impl)")
    ax.bar([i + w for i in xs], [r.roofline_tok_s for r in rows], w, label="bandwidth roofline", color="0.75")
    for i, r in enumerate(rows):
        ax.text(
            i - w,
            r.moekit_tok_s,
            f"{r.ratio_vs_hf:.1f}x\n{100 * r.roofline_fraction:.0f}%",
            ha="center",
            va="bottom",
            fontsize=7,
        )
    ax.set_xticks(list(xs), [f"{r.model.removesuffix('-like')}\nbatch {r.batch}" for r in rows], fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("decode tokens/s (log)")
    ax.set_title(f"decode, fp32, torch threads: {rows[0].threads}; label: x transformers, % of roofline", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_png(fig, path, dpi=120, what="--plot")
    plt.close(fig)


__all__ = [
    "DECODE_MODELS",
    "DEFAULT_HF_IMPLS",
    "HF_EXPERT_IMPLS",
    "QUICK_DECODE_MODELS",
    "DecodeRow",
    "plot_decode",
    "read_bandwidth",
    "run_decode_bench",
    "weight_bytes",
]
