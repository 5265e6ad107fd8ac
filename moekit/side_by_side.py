"""What the benchmarks against transformers share: loading the saved checkpoint in transformers,
interleaved rounds in a rotated order, the machine's load and its measured matmul peak.

``moekit bench --decode`` (``moekit.decode_bench``) and ``moekit bench --train``
(``moekit.train_bench``) both save a random moekit model as a Hugging Face folder, load it in
moekit and in transformers, and time the variants interleaved in one process: round r runs
every variant once, starting at variant ``r mod n``, so a shared machine's slow spells hit all
alike. Medians are reported; ratios are also taken per round (both sides of one round ran under
the same load).
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Iterator, Sequence

import torch

from moekit.errors import MoekitError

HF_EXPERT_IMPLS = ("eager", "grouped_mm", "batched_mm")  # transformers 5.24's CPU experts implementations
# NOTE: "batched_mm" gathers every chosen expert's weight matrices per token; in a full decode run
# here it was the slowest at every row (2-4x slower than the best), so it is timed only when asked for.
DEFAULT_HF_IMPLS = ("eager", "grouped_mm")


def load_transformers(folder: str, what: str, **kwargs):
    """The transformers model of the Hugging Face ``folder`` (fp32, sdpa attention, quiet; ``kwargs``
    override its config). ``what`` names the command in the one-line errors (no transformers, or one
    without experts implementations)."""
    try:
        from transformers import AutoModelForCausalLM
    except ImportError as e:
        raise MoekitError(f"{what} needs transformers (pip install 'moekit[hf]')") from e
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa", **kwargs)
    if not hasattr(model, "set_experts_implementation"):
        import transformers

        raise MoekitError(
            f"{what} compares against transformers' experts implementations, which transformers "
            f"{transformers.__version__} lacks; install transformers>=5 (pip install 'moekit[dev]')"
        )
    return model


def rotated_rounds(names: Sequence[str], rounds: int) -> Iterator[tuple[int, str]]:
    """``(round, name)`` for ``rounds`` rounds of every name, each round's order rotated by one."""
    names = list(names)
    for r in range(rounds):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            yield r, name


def paired_ratios(ours: Sequence[float], theirs: Sequence[float]) -> list[float]:
    """``ours[r] / theirs[r]`` for every round r, rounded to 3 decimals."""
    return [round(a / b, 3) for a, b in zip(ours, theirs, strict=True)]


def load_average() -> float | None:
    """The machine's 1-minute load average (None where the OS does not say)."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def matmul_peak(
    device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, n: int | None = None, repeats: int = 5
) -> float:
    """FLOP/s of one large square matmul (``2 n^3`` FLOPs; median of ``repeats`` after a warm-up)
    at the current torch threads: the machine's practical matmul peak for MFU.

    ``n`` defaults to 2048 on a CPU (about 0.1 s per product on 2 cores) and 8192 on CUDA."""
    device = torch.device(device)
    n = n or (8192 if device.type == "cuda" else 2048)
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    a @ b  # warm-up: the allocator, the BLAS library's buffers
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        sync()
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times)


__all__ = [
    "DEFAULT_HF_IMPLS",
    "HF_EXPERT_IMPLS",
    "load_average",
    "load_transformers",
    "matmul_peak",
    "paired_ratios",
    "rotated_rounds",
]
