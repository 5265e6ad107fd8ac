"""Byte counts and dtype names as users type and read them."""

from __future__ import annotations

import re

from moekit.accounting import DTYPE_BYTES
from moekit.config import ConfigError

DTYPE_ALIASES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "float8": "fp8"}


_UNITS = {
    "": 2**30,
    "b": 1,
    "k": 2**10,
    "kib": 2**10,
    "kb": 10**3,
    "m": 2**20,
    "mib": 2**20,
    "mb": 10**6,
    "g": 2**30,
    "gib": 2**30,
    "gb": 10**9,
    "t": 2**40,
    "tib": 2**40,
    "tb": 10**12,
}


def parse_memory(text: str) -> int:
    """``"80GiB"`` → bytes. GiB/MiB/TiB are binary, GB/MB/TB decimal; a bare number is GiB."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS or float(m.group(1)) <= 0:
        raise ConfigError(f"device memory must look like 80GiB, 141GB or 96 (GiB), got {text!r}")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def gib(n: float) -> str:
    """Bytes as GiB (or MiB / KiB when small), two decimals."""
    for scale, suffix in ((2**40, "TiB"), (2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {suffix}"
    return f"{n:.0f} B"


def normalise_dtype(text: str) -> str:
    """``float32`` → ``fp32`` etc.; unknown names raise naming the known ones."""
    dt = DTYPE_ALIASES.get(text, text)
    if dt not in DTYPE_BYTES:
        raise ConfigError(f"unknown dtype {text!r}; known: {', '.join([*DTYPE_BYTES, *DTYPE_ALIASES])}")
    return dt
