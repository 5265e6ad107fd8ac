"""A run directory: the files a training run writes there, and whether a run may use a folder.

``resolve_run`` decides, before anything is written, whether ``--out`` may hold this run (fresh,
``--resume`` of the same run, or ``--force`` over a moekit run — never over other files);
``RUN_ARTEFACTS`` lists exactly what ``--force`` removes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from moekit.errors import MoekitError
from moekit.files import check_folder_arg, check_unlocked, listing, read_owned, user_entries
from moekit.training.checkpoint import TOKENIZER_FILE, latest_checkpoint
from moekit.training.config import RunConfig
from moekit.training.metrics import METRICS_FILE

CONFIG_FILE = "config.json"
SUMMARY_FILE = "summary.json"
TRAIN_LOG = "train.log"  # progress lines of `moekit train` (moekit.training.progress)
# Everything a run writes into its directory; --force removes exactly these (never other files).
RUN_ARTEFACTS = (
    CONFIG_FILE,
    TOKENIZER_FILE,
    METRICS_FILE,
    SUMMARY_FILE,
    TRAIN_LOG,
    "checkpoints",
    "loss.png",
    "expert_load.png",
)
RUN_KIND = "run"  # the kind recorded in a run directory's .moekit-files.json


class RunDirError(MoekitError):
    """The output directory cannot be used for this run without --resume or --force."""


def _diff(a: Any, b: Any, path: str = "") -> str | None:
    """The first dotted key where two JSON-like values differ, as ``key: old -> new``."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            d = _diff(a.get(k), b.get(k), f"{path}.{k}" if path else k)
            if d:
                return d
        return None
    return None if a == b else f"{path}: {a!r} -> {b!r}"


def resolve_run(out: Path, run: RunConfig | None, *, resume: bool, force: bool, steps: int | None = None) -> RunConfig:
    """Check that ``out`` may hold this run and return the config to train with.

    Fresh runs need an empty or new ``out`` (or ``force``: the previous run's files are removed).
    ``resume`` continues the run saved in ``out``; ``run``, if given, must equal it except for
    ``train.steps``. ``steps`` overrides ``train.steps``.
    """
    out = check_folder_arg(out, "run directory")
    if resume and force:
        raise RunDirError("pass either --resume or --force, not both")
    check_unlocked(out, "run directory")  # refused at once while another process trains here
    if run is not None and steps is not None:
        run = run.with_overrides({"train.steps": steps})
    if not is_run_dir(out) and user_entries(out):
        raise RunDirError(
            f"{out} is not empty ({listing(user_entries(out))}) and holds no moekit run; choose a new --out "
            "(--force replaces moekit runs only)"
        )
    saved_path = out / CONFIG_FILE
    saved = RunConfig.from_json(saved_path) if saved_path.exists() and not force else None
    if resume and saved is not None:
        if run is not None:
            a, b = saved.to_dict(), run.to_dict()
            a["train"].pop("steps"), b["train"].pop("steps")
            d = _diff(a, b)
            if d:
                raise RunDirError(f"{out} holds a different run ({d}); drop --resume and pass --force to start over")
        run = saved if run is None else run
    elif saved is not None:
        d = _diff(saved.to_dict(), run.to_dict()) if run is not None else None
        if d:
            raise RunDirError(f"{out} holds a different run ({d}); pass --force to replace it or choose another --out")
        last = latest_checkpoint(out)
        done = f" ({int(last.name.removeprefix('step_'))} steps done)" if last is not None else ""
        raise RunDirError(f"{out} already holds this run{done}; pass --resume to continue it or --force to start over")
    if run is None:
        raise RunDirError(f"{out} holds no run to resume; give --preset or --config to start one")
    if steps is not None:
        run = run.with_overrides({"train.steps": steps})
    return run


def is_run_dir(out: Path) -> bool:
    """A folder moekit trained a run in: recorded as one, or (older runs) a config.json of {model, train}."""
    kind, _ = read_owned(out)
    if kind is not None:
        return kind == RUN_KIND
    try:
        data = json.loads((Path(out) / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and set(data) == {"model", "train"}


def clear_run(out: Path) -> None:
    for name in RUN_ARTEFACTS:
        p = out / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
