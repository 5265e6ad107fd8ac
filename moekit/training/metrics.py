"""``metrics.jsonl``: one JSON object per logged step, appended as training goes.

Every record has ``step``, ``loss`` (the LM cross-entropy of that step's batch), ``aux_loss`` (the
weighted balance losses added to it), ``lr``, ``tokens_per_s`` (training throughput since the
previous record, evaluation and checkpoint time excluded), ``max_vio`` (MaxVio of that step's batch,
mean over MoE layers; null for a dense model), ``grad_norm`` (before clipping), ``skipped_steps``
(steps whose update was dropped for a non-finite loss or gradient, so far; ``--skip-nonfinite``),
``tokens`` (seen so far) and ``elapsed_s`` (training time so far, across resumes). Evaluation steps add ``val_loss``
and ``expert_load`` (per MoE layer, the share of routed assignments each expert got on the
validation batches). With expert parallelism (torchrun ``--ep``) records add ``a2a_bytes`` (forward
all-to-all bytes sent between ranks during the step, all ranks and layers; backward sends as many
again) and ``a2a_s`` (the slowest rank's seconds in those exchanges).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from moekit.files import write_errors, write_text

METRICS_FILE = "metrics.jsonl"


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics file; a torn last line (a crash mid-write) is skipped."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):  # anything else is not ours
            records.append(record)
    return records


class MetricsLog:
    """Appends records to ``metrics.jsonl``; opening it at ``resume_step`` drops later records
    (logged after the checkpoint being resumed from, so they will be logged again)."""

    def __init__(self, path: Path, resume_step: int | None = None):
        self.path = Path(path)
        if resume_step is not None and self.path.exists():
            kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
            write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept), "metrics")
        elif resume_step is None:
            write_text(self.path, "", "metrics")

    def append(self, record: dict[str, Any]) -> None:
        with write_errors(self.path, "metrics"), self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


__all__ = ["METRICS_FILE", "MetricsLog", "read_metrics"]
