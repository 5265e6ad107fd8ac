"""The training loop: a run directory in, a trained, checkpointed and summarised model out.

A run directory holds::

    config.json      RunConfig: {"model": ..., "train": ...}
    tokenizer.json   the run's own copy of its BPE tokenizer (none for train.tokenizer=byte)
    metrics.jsonl    one record per logged step (see ``moekit.training.metrics``)
    checkpoints/     step_NNNNNNN/ folders (see ``moekit.training.checkpoint``)
    summary.json     written at the end: val_loss, total_params, active_params, flops_per_token, ...

One optimiser step: LM loss + the configured balance losses (``moekit.balancing.balance_terms``)
-> backward -> clip -> AdamW -> aux-loss-free bias update (when ``moe.aux_free_rate > 0``).
bf16 autocast on CUDA, plain fp32 on CPU. SIGINT/SIGTERM finish the current step, write a
checkpoint and return; resuming restores weights, optimiser, RNG states and the data position,
so on CPU the resumed loss sequence equals the uninterrupted one exactly.

A non-finite loss or gradient norm stops training before the weights change (or, with
``skip_nonfinite``, drops that step's update): see ``moekit.training.guard``. A run directory is
locked while it is trained (``moekit.files.folder_lock``) and records the files it owns, so
``force`` removes only those.

Several processes (torchrun): the hooks of ``moekit.training.distributed.Distributed`` (no-ops in
one process) shard each global batch, sync gradients, reduce balance-loss loads, decide stops and
skips together and let rank 0 alone write (and hold the run directory's lock). Anything that may
fail on one rank (the run folder, data, a write) runs through ``Distributed.together`` so every
rank fails with it instead of waiting in a collective.
"""

from __future__ import annotations

import contextlib
import functools
import math
import random
import shutil
import signal
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from moekit.accounting import account
from moekit.balancing import balance_terms, chosen_counts, max_vio, routing_stats, update_selection_bias
from moekit.config import ConfigError
from moekit.files import (
    folder_lock,
    record_owned,
    user_entries,
    write_errors,
    write_json,
    write_text,
)
from moekit.models.transformer import MoETransformer
from moekit.training.checkpoint import (
    TOKENIZER_FILE,
    check_fingerprint,
    checkpoint_dir,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)
from moekit.training.config import RunConfig
from moekit.training.data import Corpus, TrainBatches, load_corpus, val_batches
from moekit.training.distributed import Distributed
from moekit.training.guard import NonFiniteGuard, step_is_finite
from moekit.training.metrics import METRICS_FILE, MetricsLog, read_metrics
from moekit.training.optim import build_optimizer, keep_fused, lr_at
from moekit.training.run_dir import (
    CONFIG_FILE,
    RUN_ARTEFACTS,
    RUN_KIND,
    SUMMARY_FILE,
    RunDirError,
    clear_run,
    is_run_dir,
    resolve_run,
)
from moekit.training.tokenizer import BPETokenizer, ByteTokenizer, Tokenizer, get_tokenizer, tokenize

# Data -------------------------------------------------------------------------------------------


@dataclass
class RunData:
    corpus: Corpus
    tokenizer: Tokenizer
    train_tokens: np.ndarray
    val_tokens: np.ndarray


def prepare_data(run: RunConfig, tokenizer: Tokenizer | None = None) -> RunData:
    """The run's corpus, tokenizer (trained or read from the cache unless given) and token arrays."""
    t = run.train
    corpus = load_corpus(t.data, t.val_fraction)
    if tokenizer is None:
        tokenizer = get_tokenizer(t.tokenizer, run.model.vocab_size, corpus)
    if tokenizer.vocab_size > run.model.vocab_size:
        raise ConfigError(
            f"the tokenizer has {tokenizer.vocab_size} ids but vocab_size is {run.model.vocab_size}; "
            "raise vocab_size or use a smaller tokenizer"
        )
    train_tokens, val_tokens = tokenize(tokenizer, corpus)
    return RunData(corpus, tokenizer, train_tokens, val_tokens)


def read_tokenizer(run_dir: Path, run: RunConfig) -> Tokenizer:
    """The run's own tokenizer: bytes, or the BPE saved as ``tokenizer.json`` when it started."""
    if run.train.tokenizer == "byte":
        return ByteTokenizer()
    path = Path(run_dir) / TOKENIZER_FILE
    if not path.exists():
        raise RunDirError(f"{run_dir} has no {TOKENIZER_FILE}; is it a moekit run directory?")
    return BPETokenizer.from_str(path.read_text())


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} requested but CUDA is not available")
    return dev


@torch.no_grad()
def evaluate(
    model: MoETransformer, batches: list[Tensor], device: torch.device, parallel: Distributed | None = None
) -> dict[str, Any]:
    """Mean validation loss over ``batches``, and each MoE layer's expert load (shares of the
    routed assignments) with its MaxVio; the model is left in the mode it was in. With ``parallel``
    each rank evaluates its rows and the sums are reduced (collective)."""
    was_training = model.training
    model.eval()
    total, n_targets = 0.0, 0
    counts: list[Tensor] = []
    for batch in batches:
        batch = (parallel.shard_batch(batch) if parallel else batch).to(device)
        with _autocast(device):
            out = model(batch, labels=batch)
        n = batch.shape[0] * (batch.shape[1] - 1)
        total += float(out.loss) * n
        n_targets += n
        layer_counts = [r.counts_E.double().cpu() for r in out.routing]
        counts = layer_counts if not counts else [a + b for a, b in zip(counts, layer_counts, strict=True)]
    model.train(was_training)
    if parallel is not None and parallel.reduce is not None:  # sums over ranks (etp copies cancel out)
        sums = parallel.reduce(torch.tensor([total, float(n_targets)], dtype=torch.float64))
        total, n_targets = float(sums[0]), float(sums[1])
        counts = [parallel.reduce(c) for c in counts]
    loads = [(c / c.sum().clamp_min(1)).tolist() for c in counts]
    vio = sum(max_vio(c) for c in counts) / len(counts) if counts else None
    return {"val_loss": total / n_targets, "expert_load": loads, "max_vio": vio}


# The loop ---------------------------------------------------------------------------------------


class TrainCallback:
    """Hooks the loop calls; the CLI's progress bar implements them (all optional)."""

    def on_start(self, step: int, total: int) -> None: ...

    def on_step(self, step: int, record: dict[str, Any] | None) -> None: ...

    def on_end(self) -> None: ...


@dataclass
class TrainResult:
    run_dir: Path
    step: int  # steps completed
    interrupted: bool  # stopped by SIGINT/SIGTERM (a checkpoint of ``step`` was written)
    checkpoint: Path | None
    summary: dict[str, Any] | None  # None when interrupted


class _StopOnSignal:
    """SIGINT/SIGTERM ask the loop to stop after the current step; a second one interrupts at once.

    A second signal within ``GRACE_S`` of the first counts as the same request: under torchrun,
    Ctrl-C reaches every worker from the terminal and again from the launcher, which forwards it.
    """

    GRACE_S = 2.0

    def __init__(self) -> None:
        self.signum: int | None = None
        self._first_at = 0.0
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            if time.monotonic() - self._first_at > self.GRACE_S:
                raise KeyboardInterrupt
            return
        self.signum, self._first_at = signum, time.monotonic()

    def __enter__(self) -> _StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def _rng_state() -> dict[str, Any]:
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate(state["python"])


def train(
    run: RunConfig | None,
    out: str | Path,
    *,
    resume: bool = False,
    force: bool = False,
    steps: int | None = None,
    device: str | None = None,
    callback: TrainCallback | None = None,
    skip_nonfinite: bool = False,
    parallel: Distributed | None = None,
) -> TrainResult:
    """Train ``run`` into directory ``out`` (see ``resolve_run`` for --resume / --force).

    ``skip_nonfinite``: drop the update of a step whose loss or gradient norm is not finite and
    count it (metrics ``skipped_steps``) instead of stopping with ``NonFiniteStop``.
    ``parallel`` (``moekit.training.distributed``): this process's part in a torchrun launch;
    only its rank 0 creates, locks and writes the run directory and calls ``callback``.
    """
    out = Path(out)
    par = parallel or Distributed()
    run = par.together(lambda: resolve_run(out, run, resume=resume, force=force, steps=steps))
    par.together(lambda: par.setup(run.model, run.train.batch_size))
    created = par.is_main and not out.exists()
    with contextlib.ExitStack() as held:

        def create_and_lock() -> None:  # rank 0 alone; a refusal there stops every rank
            if par.is_main:
                with write_errors(out, "run directory"):
                    out.mkdir(parents=True, exist_ok=True)
                held.enter_context(folder_lock(out, "run directory"))

        try:
            par.together(create_and_lock)
            return _train(run, out, resume, force, device, callback, NonFiniteGuard(skip_nonfinite), par)
        finally:
            held.close()  # the lock goes before the folder may
            if created and not user_entries(out):  # failed before writing anything: leave no trace
                shutil.rmtree(out, ignore_errors=True)


def _train(
    run: RunConfig,
    out: Path,
    resume: bool,
    force: bool,
    device: str | None,
    callback: TrainCallback | None,
    guard: NonFiniteGuard,
    par: Distributed,
) -> TrainResult:
    dev = par.together(lambda: resolve_device(par.device(device)))
    cb = (callback or TrainCallback()) if par.is_main else TrainCallback()
    t = run.train
    ckpt = latest_checkpoint(out) if resume else None
    if ckpt is not None:  # a damaged or foreign checkpoint is refused before anything is written
        par.together(lambda: check_fingerprint(ckpt, verify_checkpoint(ckpt), run.model) if par.is_main else None)
    resumed = resume and (out / CONFIG_FILE).exists()
    tokenizer = par.together(lambda: read_tokenizer(out, run) if resumed else None)
    data = par.main_first(lambda: prepare_data(run, tokenizer))  # rank 0 fills the caches
    batches = TrainBatches(data.train_tokens, t.batch_size, t.seq_len, t.seed)
    val = val_batches(data.val_tokens, t.batch_size, t.seq_len, t.eval_batches)
    tokenizer_json = data.tokenizer.to_str() if isinstance(data.tokenizer, BPETokenizer) else None

    def write_run_files() -> None:  # runs after every rank has read the old run folder
        if not par.is_main:
            return
        if force:  # only once the new run is known to start: a bad config or corpus keeps the old run
            clear_run(out)
        record_owned(out, RUN_KIND, RUN_ARTEFACTS)
        write_json(out / CONFIG_FILE, run.to_dict(), "run config")
        if tokenizer_json is not None:
            write_text(out / TOKENIZER_FILE, tokenizer_json, "tokenizer")

    par.barrier()
    par.together(write_run_files)

    torch.manual_seed(t.seed)
    random.seed(t.seed)
    model = MoETransformer(run.model).to(dev)
    model.train()
    step, position, elapsed = 0, 0, 0.0
    # Full weights under global expert ids, whatever layout wrote them; then this rank's shard.
    state = par.together(lambda: load_checkpoint(ckpt, model, dev)) if ckpt is not None else None
    model = par.parallelize(model)
    opt = build_optimizer(model, run)
    if state is not None:
        par.load_optimizer_state(model, opt, state["optimizer"])
        keep_fused(opt)  # a checkpoint's param groups carry their own 'fused' flag
        _set_rng_state(state["rng"])
        step, position, elapsed = state["step"], state["position"], state["elapsed_s"]
        guard.skipped = state.get("skipped_steps", 0)
        if state["corpus_digest"] != data.corpus.digest:
            warnings.warn(
                f"the training text changed since {ckpt} was written; the resumed run will not match an uninterrupted one",
                stacklevel=2,
            )
    metrics = par.together(
        lambda: MetricsLog(out / METRICS_FILE, resume_step=step if resume else None) if par.is_main else None
    )
    moe = run.model.moe

    def save() -> Path:
        state = {"step": step, "position": position, "elapsed_s": elapsed, "corpus_digest": data.corpus.digest}
        state["skipped_steps"] = guard.skipped
        state.update(optimizer=par.optimizer_state(model, opt), rng=_rng_state())
        tensors = par.model_state(model)  # gathered (collective): global expert ids, whatever the layout
        # Rank 0 writes; the others wait for it, and fail with it (a full disk stops every rank).
        written = par.together(
            lambda: (
                save_checkpoint(out, step, model, state, t.keep_checkpoints, tokenizer_json, tensors=tensors)
                if par.is_main
                else None
            )
        )
        return written or checkpoint_dir(out) / f"step_{step:07d}"

    cb.on_start(step, t.steps)
    tokens_per_step = t.batch_size * t.seq_len
    last_log_elapsed, last_log_step = elapsed, step  # throughput counts step time only, not evals or saves
    saved_at: Path | None = ckpt
    try:
        with _StopOnSignal() as stop:
            while step < t.steps:
                if par.should_stop(stop.signum is not None):  # decided together: every rank saves
                    return TrainResult(out, step, True, save(), None)
                t0 = time.perf_counter()
                lr = lr_at(step, run)
                for group in opt.param_groups:
                    group["lr"] = lr
                batch = par.shard_batch(batches.batch(position)).to(dev)  # this rank's rows
                with _autocast(dev):
                    output = model(batch, labels=batch)
                terms = balance_terms(output.routing, moe, par.reduce) if moe is not None else {}
                aux = sum(terms.values()) if terms else torch.zeros((), device=dev)
                opt.zero_grad(set_to_none=True)
                (output.loss + aux).backward()
                par.sync_gradients(model)
                grad_norm = par.clip_grad_norm_(model, t.grad_clip or math.inf)  # the global norm
                # Non-finite loss or gradient on any rank: every rank stops (or skips the update)
                # before the weights change. NOTE: one all-reduced flag, so no rank is left alone
                # in a collective and the ranks' guards count alike.
                if par.all_true(step_is_finite(output.loss + aux, grad_norm)):
                    guard.good_step()
                    opt.step()
                    if moe is not None and moe.aux_free_rate > 0:
                        update_selection_bias(model, par.global_loads([chosen_counts(r)[0] for r in output.routing]))
                else:
                    loss = torch.tensor(par.mean(output.loss + aux))  # what the ranks saw together
                    guard.bad_step(step + 1, loss, grad_norm, saved_at)
                step += 1
                position += t.batch_size
                elapsed += time.perf_counter() - t0
                record = None
                a2a = par.all_to_all_metrics(model)
                if step % t.log_every == 0 or step % t.eval_every == 0 or step == t.steps:
                    stats = routing_stats(output.routing, output.moe_layer_ids) if output.routing else {}
                    record = {
                        "step": step,
                        "loss": par.mean(output.loss),
                        "aux_loss": par.mean(aux),
                        "lr": lr,
                        "tokens_per_s": (step - last_log_step)
                        * tokens_per_step
                        / max(elapsed - last_log_elapsed, 1e-9),
                        "max_vio": par.global_max_vio(output.routing, stats.get("max_vio")),
                        "grad_norm": float(grad_norm),
                        "skipped_steps": guard.skipped,
                        "tokens": position * t.seq_len,
                        "elapsed_s": elapsed,
                        **a2a,
                    }
                    if step % t.eval_every == 0 or step == t.steps:
                        ev = evaluate(model, val, dev, par)
                        record.update(val_loss=ev["val_loss"], expert_load=ev["expert_load"])
                    # NOTE: together() costs one all-reduce per logged step; without it a full disk on
                    # rank 0 would leave the other ranks waiting in the next step's collectives.
                    par.together(functools.partial(metrics.append, record) if metrics is not None else lambda: None)
                    last_log_elapsed, last_log_step = elapsed, step
                if step % t.ckpt_every == 0 or step == t.steps:
                    saved_at = save()
                cb.on_step(step, record)
    finally:
        cb.on_end()
    summary = write_summary(out, run, model, val, dev, step, elapsed, data, guard.skipped, par)
    return TrainResult(out, step, False, saved_at, summary)


def write_summary(
    out: Path,
    run: RunConfig,
    model: MoETransformer,
    val: list[Tensor],
    dev: torch.device,
    step: int,
    elapsed: float,
    data: RunData,
    skipped: int = 0,
    parallel: Distributed | None = None,
) -> dict[str, Any]:
    """Evaluate the final model and write ``summary.json`` (every rank evaluates; rank 0 writes)."""
    par = parallel or Distributed()
    ev = evaluate(model, val, dev, par)
    report = account(run.model, seq_len=run.train.seq_len).to_dict()
    logged = [r for r in read_metrics(out / METRICS_FILE) if "loss" in r]
    summary = {
        "val_loss": ev["val_loss"],
        "val_ppl": math.exp(min(ev["val_loss"], 50.0)),
        "total_params": report["total"],
        "active_params": report["active"],
        "flops_per_token": report["flops_per_token"],
        "train_flops_per_token": report["flops"]["train_per_token"],
        "max_vio": ev["max_vio"],
        "train_loss": logged[-1]["loss"] if logged else None,
        "steps": step,
        "tokens": step * run.train.batch_size * run.train.seq_len,
        "train_time_s": elapsed,
        "skipped_steps": skipped,
        "tokenizer": data.tokenizer.kind,
        "vocab_size": run.model.vocab_size,
        "corpus": data.corpus.source,
        "train_corpus_tokens": int(len(data.train_tokens)),
        "val_corpus_tokens": int(len(data.val_tokens)),
    }
    if par.active:
        summary["layout"] = par.layout.to_dict()
    par.together(lambda: write_json(out / SUMMARY_FILE, summary, "run summary") if par.is_main else None)
    return summary


# Loading a trained run --------------------------------------------------------------------------


@dataclass
class LoadedRun:
    config: RunConfig
    model: MoETransformer
    tokenizer: Tokenizer
    step: int
    checkpoint: Path


def load_run(run_dir: str | Path, checkpoint: str | Path | None = None, device: str | None = None) -> LoadedRun:
    """A run's model from its newest (or the given) checkpoint, in eval mode, with its tokenizer."""
    run_dir = Path(run_dir)
    if not (run_dir / CONFIG_FILE).exists():
        raise RunDirError(f"{run_dir} is not a moekit run directory (no {CONFIG_FILE})")
    if not is_run_dir(run_dir):
        raise RunDirError(f"{run_dir} is not a moekit run directory (its {CONFIG_FILE} is not a run's)")
    run = RunConfig.from_json(run_dir / CONFIG_FILE)
    path = Path(checkpoint) if checkpoint is not None else latest_checkpoint(run_dir)
    if path is None:
        raise RunDirError(f"{run_dir} has no checkpoint yet ({checkpoint_dir(run_dir)} is empty)")
    if not path.exists():  # a bare checkpoint name, e.g. step_0000100
        path = checkpoint_dir(run_dir) / path
    dev = resolve_device(device)
    model = MoETransformer(run.model).to(dev)
    state = load_checkpoint(path, model, dev)
    model.eval()
    return LoadedRun(run, model, read_tokenizer(run_dir, run), state["step"], path)


__all__ = [
    "LoadedRun",
    "RunData",
    "RunDirError",
    "TrainCallback",
    "TrainResult",
    "build_optimizer",
    "evaluate",
    "is_run_dir",
    "load_run",
    "lr_at",
    "prepare_data",
    "resolve_device",
    "resolve_run",
    "train",
]
