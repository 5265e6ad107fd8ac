"""Training on N processes (``torchrun --nproc-per-node N -m moekit train``): the glue between the
training loop and ``moekit.parallel``.

``Distributed`` is the process's place in the run; one process gets an instance whose every hook
is a no-op, so the loop has one code path. What it decides:
- data: the global batch at a position is the same whatever the world size; data rank ``i`` of
  ``dp`` takes rows ``i*B/dp ... (i+1)*B/dp`` (its etp group shares them), so N processes see
  exactly the batches one process would;
- only rank 0 writes (run folder, metrics, progress, summary, checkpoints); checkpoints hold the
  gathered tensors under global expert ids, so a run resumes under any layout;
- stops (SIGINT/SIGTERM on any rank) and the ``NonFiniteGuard``'s verdict (a non-finite loss or
  gradient norm on any rank) are one all-reduced flag per step, so every rank stops, or skips
  the update, at the same step, never one rank hanging in a collective;
- anything that may fail on one rank (the run folder and its lock, data, the layout, rank 0's
  writes) is run ``together``: every rank learns whether some rank failed and exits with that
  rank's exit code; the lowest failing rank alone prints its error (``MoekitError.speaks``);
- threads: ``moekit.runtime.set_threads`` shares the free cores among the processes on this
  machine (torchrun's own OMP_NUM_THREADS=1 is not taken as a choice); ``--threads``,
  ``MOEKIT_THREADS`` or a user's ``OMP_NUM_THREADS`` override.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from moekit import runtime
from moekit.balancing import chosen_counts, max_vio
from moekit.config import ConfigError, ModelConfig
from moekit.errors import MoekitError
from moekit.parallel import (
    Layout,
    all_reduce_sum,
    clip_grad_norm_,
    full_optimizer_state,
    full_state_dict,
    parallelize,
    shard_optimizer_state,
    sync_gradients,
)
from moekit.parallel.expert_parallel import AllToAllDispatcher

T = TypeVar("T")


class OtherRankFailed(MoekitError):
    """Another rank failed in a step every rank runs together (that rank printed why); its exit code."""

    speaks = False

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def launched_ranks() -> int:
    """The number of processes torchrun started (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """Rank 0 (or no torchrun): the process that prints and writes."""
    return os.environ.get("RANK", "0") == "0"


class Distributed:
    """This process's place in a (possibly one-process) training run."""

    def __init__(self, ep: int | None = None, etp: int | None = None, backend: str = "auto"):
        self.world_size = launched_ranks()
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(self.world_size)))
        self.ep, self.etp = ep, etp
        if backend not in ("auto", "gloo", "nccl"):
            raise ConfigError(f"--backend must be auto, gloo or nccl, got {backend!r}")
        if backend == "nccl" and not torch.cuda.is_available():
            raise ConfigError("--backend nccl needs CUDA, which is not available here; use --backend gloo")
        if backend == "auto":
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        self.backend = backend
        self.layout = Layout.for_world(self.world_size, ep, etp)  # checked against the model in setup
        self.started = self._owns_group = False
        if self.world_size > 1 and dist.is_initialized():  # the caller's process group: used as it is
            self.backend, self.started = str(dist.get_backend()), True
        elif self.world_size > 1:
            if runtime.applied() is None:  # the CLI chose already (--threads); a library caller gets the default
                runtime.set_threads()
            if backend == "nccl":
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group(backend, timeout=datetime.timedelta(minutes=10))
            self.started = self._owns_group = True

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.started

    def device(self, requested: str | None) -> str | None:
        """With NCCL every process uses its own GPU."""
        if self.started and self.backend == "nccl":
            return f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
        return requested

    def relaunch_prefix(self) -> str:
        """How this run was launched, for "continue with" hints ("" in one process)."""
        return f"torchrun --nproc-per-node {self.world_size} -m " if self.world_size > 1 else ""

    def flags(self) -> str:
        return "".join(f" --{k} {v}" for k, v in (("ep", self.ep), ("etp", self.etp)) if v is not None)

    def close(self) -> None:
        if self._owns_group and dist.is_initialized():
            dist.destroy_process_group()
        self.started = self._owns_group = False

    # Running steps that may fail ----------------------------------------------------------------

    def _any(self, flag: bool) -> bool:
        if not self.started:
            return flag
        return bool(self._max(torch.tensor([1 if flag else 0])))

    def _max(self, t: Tensor) -> int:
        """The MAX over ranks of a one-element integer tensor."""
        t = t.to(dtype=torch.int64, device=self._comm_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    def _comm_device(self) -> str:
        return f"cuda:{torch.cuda.current_device()}" if self.backend == "nccl" else "cpu"

    def together(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on every rank; if it raises a ``MoekitError`` on any rank, raise on every rank.

        The lowest failing rank raises its own error (and the CLI prints it: ``speaks``); every
        other rank raises a silent ``OtherRankFailed`` with that error's exit code, so a full disk
        on rank 0 exits 1 everywhere and a bad config 2."""
        error: MoekitError | None = None
        try:
            result = fn()
        except MoekitError as e:
            error = e
        if not self.started:
            if error is not None:
                raise error
            return result
        # NOTE: one all-reduce says who failed first and how: MAX of (world - rank) * 10 + exit code.
        code = min(max(int(error.exit_code), 1), 9) if error is not None else 0
        key = torch.tensor([(self.world_size - self.rank) * 10 + code if error is not None else 0])
        key = self._max(key)
        if key == 0:
            return result
        first, first_code = self.world_size - key // 10, key % 10
        if error is not None and first == self.rank:
            error.speaks = True
            raise error
        raise OtherRankFailed(f"rank {first} failed (it printed why)", first_code)

    def all_true(self, flag: Tensor | bool) -> bool:
        """Whether ``flag`` holds on every rank (one all-reduce); every rank gets the same answer."""
        return not self._any(not bool(flag))

    def main_first(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on rank 0 first (it fills caches: tokenizer, tokens), then on the others."""
        if not self.started:
            return fn()
        first = self.together(fn if self.is_main else lambda: None)
        later = self.together(lambda: None if self.is_main else fn())
        return first if self.is_main else later

    def barrier(self) -> None:
        if self.started:
            dist.barrier()

    # Model ----------------------------------------------------------------------------------------

    def setup(self, model_cfg: ModelConfig, batch_size: int) -> None:
        """Check the layout against the model and the batch (every rank raises the same error)."""
        moe = model_cfg.moe
        self.layout.validate(
            self.world_size, moe.n_routed_experts if moe else None, moe.expert_ffn_dim if moe else None
        )
        if batch_size % self.layout.dp:
            raise ConfigError(
                f"train.batch_size ({batch_size}) must be divisible by the {self.layout.dp} data-parallel ranks"
            )

    def parallelize(self, model: nn.Module) -> nn.Module:
        return parallelize(model, self.layout) if self.started else model

    def shard_batch(self, batch: Tensor) -> Tensor:
        """This rank's rows of a global batch (its etp group shares them)."""
        if not self.started:
            return batch
        b = batch.shape[0] // self.layout.dp
        i = self.layout.coords(self.rank).dp_index
        return batch[i * b : (i + 1) * b]

    @property
    def reduce(self) -> Callable[[Tensor], Tensor] | None:
        """Sums routing counts over ranks for the balance losses (None in one process)."""
        return all_reduce_sum if self.started else None

    def sync_gradients(self, model: nn.Module) -> None:
        sync_gradients(model)

    def clip_grad_norm_(self, model: nn.Module, max_norm: float) -> Tensor:
        return clip_grad_norm_(model, max_norm)

    def global_loads(self, loads: list[Tensor]) -> list[Tensor]:
        """Expert loads summed over ranks (the aux-free bias must be the same on every rank)."""
        return [all_reduce_sum(x) for x in loads] if self.started else loads

    def global_max_vio(self, routings: list, local: float | None) -> float | None:
        """MaxVio (mean over MoE layers) of the global batch's loads; ``local`` in one process."""
        if not self.started or not routings:
            return local
        loads = self.global_loads([chosen_counts(r)[0] for r in routings])
        return sum(max_vio(c) for c in loads) / len(loads)

    def mean(self, value: Tensor) -> float:
        """A scalar averaged over ranks (the etp copies of a micro-batch count alike)."""
        return (
            float(all_reduce_sum(value.detach().float()) / self.world_size) if self.started else float(value.detach())
        )

    def should_stop(self, local: bool) -> bool:
        """Whether any rank wants to stop (a signal, a non-finite loss): every rank gets the same answer."""
        return self._any(local)

    # State ----------------------------------------------------------------------------------------

    def model_state(self, model: nn.Module) -> dict[str, Tensor]:
        return full_state_dict(model)

    def optimizer_state(self, model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
        return full_optimizer_state(model, opt)

    def load_optimizer_state(self, model: nn.Module, opt: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        opt.load_state_dict(shard_optimizer_state(model, opt, state))

    # All-to-all metrics ---------------------------------------------------------------------------

    def all_to_all_metrics(self, model: nn.Module) -> dict[str, float]:
        """``a2a_bytes`` (forward bytes sent between ranks, all ranks and layers; backward sends
        as many again) and ``a2a_s`` (the slowest rank's forward seconds in the exchanges) since
        the last call; empty without expert parallelism. Collective."""
        stats = [
            m.dispatcher.stats
            for m in model.modules()
            if isinstance(getattr(m, "dispatcher", None), AllToAllDispatcher)
        ]
        if not stats:
            return {}
        nbytes = torch.tensor([float(sum(s.bytes_sent for s in stats))], device=self._comm_device())
        seconds = torch.tensor([sum(s.seconds for s in stats)], device=self._comm_device())
        for s in stats:
            s.reset()
        dist.all_reduce(nbytes)
        dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
        return {"a2a_bytes": int(nbytes.item()), "a2a_s": float(seconds.item())}
