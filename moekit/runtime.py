"""CPU runtime settings: how many intra-op threads a run takes, and OpenMP's wait policy.

A training step on a CPU is thousands of small ops; each forks and joins torch's OpenMP team. A
team larger than the cores actually free makes every join wait for a descheduled (or spinning)
member, so on a 2-core machine with one core busy 2 threads ran 20 steps of the tiny preset in 62 s
against 45 s with 1 (30 s idle with 2). So the thread count follows the machine, read once at
start-up:

- the cores this process may use: ``os.sched_getaffinity``, capped by a cgroup CPU quota
  (``/sys/fs/cgroup/cpu.max``, or cgroup v1's ``cpu.cfs_quota_us``);
- how busy they are with other processes: ``/proc/stat``'s per-CPU busy time over ``SAMPLE_S``
  seconds, minus this process's own CPU time and (under torchrun) its sibling ranks';
- under torchrun, the processes on this machine (``LOCAL_WORLD_SIZE``) share the rest.

``choose_threads`` is a pure function of those ``Machine`` readings and the user's settings; the
user decides first: ``--threads N``, then ``MOEKIT_THREADS``, then ``OMP_NUM_THREADS`` (except
the ``1`` torchrun puts there itself when it starts several processes and the user set nothing).
``ThreadChoice.line`` says what was chosen and why, for the run's log. During a run,
``LoadWatch`` re-reads the load every few seconds and changes the threads when the choice changes.
On a busy machine the CLI also sets OpenMP's wait policy to passive before torch loads
(``prepare_openmp``), unless the user set one.

Layering: imported by training, cli and parallel; imports nothing of moekit above ``config``, and
torch only inside the functions that apply a choice, so the CLI can set ``OMP_WAIT_POLICY``
(``prepare_openmp``) before anything loads libgomp.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from moekit.config import ConfigError

SAMPLE_S = 0.3  # how long the busy-ness of the cores is sampled at start-up
# NOTE: a core counts as free while other processes use at most this share of it. An OpenMP team
# with a member on a core another process holds waits a time slice at every join, so a partly
# busy core is not worth a thread; 0.25 leaves room for the noise of short-lived processes.
TOLERATED_BUSY = 0.25
PROC_STAT = Path("/proc/stat")
CGROUP_ROOT = Path("/sys/fs/cgroup")

Source = Literal["--threads", "MOEKIT_THREADS", "OMP_NUM_THREADS", "auto"]


@dataclass(frozen=True)
class Machine:
    """What the process sees of the machine at start-up."""

    cores: int  # CPUs in this process's affinity mask
    quota: float | None = None  # cgroup CPU quota in cores (None: no quota)
    busy: float | None = None  # cores' worth of CPU time other processes used while sampled (None: unknown)
    local_world: int = 1  # processes of this run on this machine (torchrun's LOCAL_WORLD_SIZE)

    @property
    def usable(self) -> int:
        """Cores this process's run may use: its affinity, capped by the cgroup quota (rounded down)."""
        if self.quota is None:
            return self.cores
        return max(1, min(self.cores, math.floor(self.quota + 1e-9)))


@dataclass(frozen=True)
class ThreadChoice:
    threads: int  # torch intra-op threads per process
    source: Source
    line: str  # for the run's log, e.g. "threads: 1 (2 cores usable, 1.0 busy with other processes; ...)"


def _positive(text: str | None) -> int | None:
    """A positive integer, or None for anything else (OMP_NUM_THREADS may be a list: "4,2" -> 4)."""
    if text is None:
        return None
    try:
        value = int(text.split(",")[0].strip())
    except ValueError:
        return None
    return value if value >= 1 else None


def choose_threads(
    machine: Machine, requested: int | None = None, env: Mapping[str, str] | None = None
) -> ThreadChoice:
    """Intra-op threads per process for ``machine``: ``requested`` (``--threads``), else
    ``MOEKIT_THREADS``, else ``OMP_NUM_THREADS``, else the usable cores not taken by other
    processes, shared among this machine's processes. Raises ``ConfigError`` for a bad
    ``requested`` or ``MOEKIT_THREADS``."""
    env = os.environ if env is None else env
    if requested is not None:
        if requested < 1:
            raise ConfigError(f"--threads must be a positive integer, got {requested}")
        return ThreadChoice(requested, "--threads", f"threads: {requested} (--threads)")
    if "MOEKIT_THREADS" in env:
        value = _positive(env["MOEKIT_THREADS"])
        if value is None or "," in env["MOEKIT_THREADS"]:
            raise ConfigError(f"MOEKIT_THREADS must be a positive integer, got {env['MOEKIT_THREADS']!r}")
        return ThreadChoice(value, "MOEKIT_THREADS", f"threads: {value} (MOEKIT_THREADS={value})")
    omp = _positive(env.get("OMP_NUM_THREADS"))
    # torchrun sets OMP_NUM_THREADS=1 for its processes when the user set nothing: not a choice.
    if omp is not None and not (machine.local_world > 1 and env.get("OMP_NUM_THREADS", "").strip() == "1"):
        return ThreadChoice(omp, "OMP_NUM_THREADS", f"threads: {omp} (OMP_NUM_THREADS={env['OMP_NUM_THREADS']})")
    usable, busy = machine.usable, machine.busy
    free = usable - min(max(busy or 0.0, 0.0), usable)
    per_process = max(1, usable // machine.local_world)
    threads = max(1, min(per_process, math.floor(free / machine.local_world + TOLERATED_BUSY)))
    why = f"{usable} core{'s' if usable != 1 else ''} usable"
    if machine.quota is not None and usable < machine.cores:
        why += f" (cgroup quota {machine.quota:g} of {machine.cores})"
    why += (
        ", busy with other processes: unknown" if busy is None else f", {max(busy, 0.0):.1f} busy with other processes"
    )
    if machine.local_world > 1:
        why += f", {machine.local_world} processes on this machine"
    per = " per process" if machine.local_world > 1 else ""
    return ThreadChoice(threads, "auto", f"threads: {threads}{per} ({why}; set --threads to override)")


# Reading the machine ----------------------------------------------------------------------------


def affinity_cores() -> set[int]:
    """The CPUs this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return set(os.sched_getaffinity(0))
    return set(range(os.cpu_count() or 1))


def parse_cpu_max(text: str) -> float | None:
    """cgroup v2 ``cpu.max`` ("QUOTA PERIOD" or "max PERIOD") -> cores, None without a quota."""
    parts = text.split()
    if not parts or parts[0] == "max":
        return None
    try:
        quota, period = float(parts[0]), float(parts[1]) if len(parts) > 1 else 100_000.0
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def cgroup_quota(root: Path = CGROUP_ROOT) -> float | None:
    """This process's CPU quota in cores (cgroup v2, else v1), None when there is none or it is unreadable."""
    try:
        # cgroup v2: /proc/self/cgroup reads "0::/path"; the quota is the tightest on the way up.
        rel = next(
            (
                line.split("::", 1)[1].strip()
                for line in Path("/proc/self/cgroup").read_text().splitlines()
                if line.startswith("0::")
            ),
            "/",
        )
    except OSError:
        rel = "/"
    quotas = []
    folder = root / rel.lstrip("/")
    while True:
        try:
            q = parse_cpu_max((folder / "cpu.max").read_text())
            if q is not None:
                quotas.append(q)
        except OSError:
            pass
        if folder == root or root not in folder.parents:
            break
        folder = folder.parent
    if quotas:
        return min(quotas)
    try:  # cgroup v1
        quota = float((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = float((root / "cpu" / "cpu.cfs_period_us").read_text())
        return quota / period if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None


def _cpu_times(cpus: set[int], stat: Path = PROC_STAT) -> tuple[float, float]:
    """(busy, total) jiffies summed over ``cpus`` from ``/proc/stat``."""
    busy = total = 0.0
    for line in stat.read_text().splitlines():
        name, *fields = line.split()
        if not name.startswith("cpu") or name == "cpu" or int(name[3:]) not in cpus:
            continue
        values = [float(v) for v in fields[:8]]  # user nice system idle iowait irq softirq steal
        total += sum(values)
        busy += sum(values) - values[3] - values[4]
    return busy, total


def _sibling_pids() -> list[int]:
    """Other processes with this process's parent (torchrun's other ranks on this machine)."""
    me, parent, found = os.getpid(), os.getppid(), []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == parent:
            found.append(int(entry.name))
    return found


def _process_cpu_s(pids: list[int]) -> float:
    """CPU seconds (user + system) the processes ``pids`` have used so far (the vanished count 0)."""
    tick, seconds = os.sysconf("SC_CLK_TCK"), 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        seconds += (float(fields[11]) + float(fields[12])) / tick  # utime, stime (fields 14, 15)
    return seconds


def busy_cores(cpus: set[int], seconds: float = SAMPLE_S, siblings: bool = False) -> float | None:
    """Cores' worth of ``cpus``' time that other processes used over ``seconds`` (this process and,
    with ``siblings``, its parent's other children excluded); None where ``/proc`` cannot tell."""
    try:
        pids = _sibling_pids() if siblings else []
        busy0, total0 = _cpu_times(cpus)
        own0, sib0, t0 = time.process_time(), _process_cpu_s(pids), time.monotonic()
        time.sleep(seconds)
        busy1, total1 = _cpu_times(cpus)
        own1, sib1, t1 = time.process_time(), _process_cpu_s(pids), time.monotonic()
    except (OSError, ValueError, IndexError):
        return None
    if total1 <= total0 or t1 <= t0:
        return None
    busy = (busy1 - busy0) / (total1 - total0) * len(cpus)  # cores' worth over the sample
    ours = (own1 - own0 + sib1 - sib0) / (t1 - t0)
    return max(0.0, busy - ours)


def local_world_size(env: Mapping[str, str] | None = None) -> int:
    """Processes of this run on this machine: torchrun's LOCAL_WORLD_SIZE (else WORLD_SIZE, else 1)."""
    env = os.environ if env is None else env
    value = _positive(env.get("LOCAL_WORLD_SIZE") or env.get("WORLD_SIZE"))
    return value or 1


TRAINING_COMMANDS = ("train", "quickstart")  # the commands prepare_openmp acts for
_machine: tuple[float, Machine] | None = None  # (when read, what was read)
_wait_policy_set: str | None = None  # what prepare_openmp set
_applied: ThreadChoice | None = None  # what set_threads applied, and from which reading
_applied_machine: Machine | None = None


def read_machine(sample_s: float = SAMPLE_S, fresh_s: float = 10.0) -> Machine:
    """The machine as this process sees it (a reading younger than ``fresh_s`` is reused: the CLI
    reads it before torch loads, for ``prepare_openmp``, and again to choose the threads)."""
    global _machine
    if _machine is None or time.monotonic() - _machine[0] > fresh_s:
        cpus, local_world = affinity_cores(), local_world_size()
        busy = busy_cores(cpus, sample_s, siblings=local_world > 1)
        _machine = (time.monotonic(), Machine(len(cpus), cgroup_quota(), busy, local_world))
    return _machine[1]


def prepare_openmp(argv: list[str], machine: Machine | None = None) -> str | None:
    """Before anything loads libgomp (it reads OMP_WAIT_POLICY once, when torch is imported): for
    a training command (``argv[0]``: train, quickstart) on a busy machine, and unless the user set
    a policy (OMP_WAIT_POLICY or libgomp's GOMP_SPINCOUNT), set ``OMP_WAIT_POLICY=passive``.
    Returns the policy set, or None.

    NOTE: by default an OpenMP worker spins for a while after each parallel region (libgomp:
    GOMP_SPINCOUNT 300000; passive: 0), waiting for the next; on a machine whose cores other
    processes want, the spinning steals their time. Measured before (moekit.layers.expert_threads):
    a DeepSeek-V3-like layer on a busy 2-core machine ran 45x dense with the default spin against
    2.0x with passive single-threaded workers. Measured here (scripts/busy_machine.py --cases
    idle-1,busy-auto,busy-2 --wait-policy default,spin --steps 10 --rounds 2; 2 cores, one kept
    busy by a spinning process while other jobs took about one more, load average 3.7-4.7): 10
    steps of the tiny preset forced to 2 threads took 66.3 and 82.5 s with libgomp's spin against
    15.9 and 16.2 s passive; 1 thread took 18.3 and 18.4 s. Under heavier load (6 steps, load
    average 4-6) the two policies were within the noise (default 12.9, 18.2, 14.3 s; passive
    15.6, 14.0, 14.8 s). With one core spinning on an otherwise quiet machine, 20 steps on 2
    passive threads took 19.1 s against 17.6 s on 1 thread idle (the issue measured 62 s against
    46 s with the spin). On the idle machine, 2 threads: spin 10.8 and 11.5 s, passive 10.5 and
    13.6 s (--cases idle-2 --wait-policy spin,passive --rounds 2): no gain, maybe a small cost,
    so an idle start keeps OpenMP's default and its quick wake-ups; passive is set for a busy
    start, where spinning takes time other processes want.
    """
    global _wait_policy_set
    user_set = "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ
    if user_set or "torch" in sys.modules or not argv or argv[0] not in TRAINING_COMMANDS:
        return None
    machine = machine or read_machine()
    if machine.busy is None or machine.busy <= TOLERATED_BUSY:
        return None
    os.environ["OMP_WAIT_POLICY"] = _wait_policy_set = "passive"
    return _wait_policy_set


# Applying it ------------------------------------------------------------------------------------


def set_threads(requested: int | None = None, machine: Machine | None = None) -> ThreadChoice:
    """Choose this process's intra-op threads (``choose_threads``) and give them to torch. The
    machine is read only when the user left the choice to moekit. The experts' worker pool
    (``moekit.layers.expert_threads``) follows ``torch.get_num_threads()``: 1 thread, no pool."""
    import torch

    global _applied, _applied_machine
    env = os.environ
    if machine is None:  # sampling the load takes SAMPLE_S: only when the user's settings leave it to us
        machine = Machine(len(affinity_cores()), local_world=local_world_size())
        if choose_threads(machine, requested, env).source == "auto":
            machine = read_machine()
    choice = choose_threads(machine, requested, env)
    if _wait_policy_set is not None and env.get("OMP_WAIT_POLICY") == _wait_policy_set:
        line = f"{choice.line}; OpenMP waits {_wait_policy_set} (busy machine)"
        choice = ThreadChoice(choice.threads, choice.source, line)
    torch.set_num_threads(choice.threads)
    _applied, _applied_machine = choice, machine
    return choice


@contextlib.contextmanager
def run_threads(requested: int | None = None, machine: Machine | None = None) -> Iterator[ThreadChoice]:
    """``set_threads`` for the block; torch's previous thread count comes back after it (the CLI's
    ``main`` may run inside a longer-lived process: tests, notebooks)."""
    global _applied, _applied_machine
    import torch

    previous, previous_choice = torch.get_num_threads(), (_applied, _applied_machine)
    try:
        yield set_threads(requested, machine)
    finally:
        torch.set_num_threads(previous)
        _applied, _applied_machine = previous_choice


class LoadWatch:
    """Follows the machine's load during a run: ``check()``, called between training steps from the
    thread that runs them, re-reads the cores' busy-ness over the time since the last reading (no
    sleeping: two readings ``every_s`` apart) and, when the automatic choice changes, gives torch
    the new thread count and returns a line saying so. A choice the user made is never changed.

    NOTE: ``torch.set_num_threads`` sets the OpenMP team of the calling thread only, so it must be
    the training thread that calls ``check``, not a monitor thread.
    """

    def __init__(
        self,
        choice: ThreadChoice,
        machine: Machine,
        every_s: float = 10.0,
        read: Callable[[], tuple[float, float, float]] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.choice, self.machine, self.every_s, self.clock = choice, machine, every_s, clock
        self.read = read or self._read_proc  # -> (busy jiffies, all jiffies, this process's CPU seconds)
        self.active = choice.source == "auto" and (read is not None or PROC_STAT.exists())
        self._cpus = affinity_cores()
        self._last = self._reading() if self.active else None

    def _read_proc(self) -> tuple[float, float, float]:
        return (*_cpu_times(self._cpus), time.process_time())

    def _reading(self) -> tuple[float, float, float, float] | None:
        try:
            return (*self.read(), self.clock())
        except (OSError, ValueError, IndexError):
            return None

    def check(self) -> str | None:
        """The new choice's log line when the threads changed, else None."""
        if not self.active or self._last is None or self.clock() - self._last[3] < self.every_s:
            return None
        now = self._reading()
        if now is None:
            return None
        before, self._last = self._last, now
        if now[1] <= before[1] or now[3] <= before[3]:
            return None
        busy = (now[0] - before[0]) / (now[1] - before[1]) * self.machine.cores
        others = max(0.0, busy - (now[2] - before[2]) / (now[3] - before[3]))
        m = self.machine
        choice = choose_threads(Machine(m.cores, m.quota, others, m.local_world), env={})
        if choice.threads == self.choice.threads:
            return None
        import torch

        torch.set_num_threads(choice.threads)
        old, self.choice = self.choice.threads, choice
        line = choice.line.replace("threads: ", f"threads: {old} -> ", 1)
        return line.replace("; set --threads", "; the load changed; set --threads")


def follow_load(every_s: float = 10.0) -> Callable[[], str | None] | None:
    """``LoadWatch.check`` for the choice ``set_threads`` applied, when moekit made it in one
    process (None otherwise: under torchrun the ranks keep their first choice, so they stay alike)."""
    if _applied is None or _applied.source != "auto" or local_world_size() > 1:
        return None
    return LoadWatch(_applied, _applied_machine or read_machine(), every_s).check


def applied() -> ThreadChoice | None:
    """The choice ``set_threads`` last applied in this process (None: torch's own default)."""
    return _applied


__all__ = [
    "Machine",
    "LoadWatch",
    "ThreadChoice",
    "affinity_cores",
    "applied",
    "busy_cores",
    "cgroup_quota",
    "choose_threads",
    "follow_load",
    "local_world_size",
    "parse_cpu_max",
    "prepare_openmp",
    "read_machine",
    "run_threads",
    "set_threads",
]
