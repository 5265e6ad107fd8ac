"""Thread choice (``moekit.runtime``) from injected machine readings, the user's settings winning
over it, the readers of /proc/stat and cgroup files on hand-made files, and the choice reaching
torch and the run's log through ``moekit train --threads``."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from moekit import runtime
from moekit.cli import main
from moekit.cli import train as train_cli
from moekit.config import ConfigError
from moekit.layers.expert_threads import _map_experts
from moekit.runtime import Machine, choose_threads

NO_ENV: dict[str, str] = {}

machines = st.builds(
    Machine,
    cores=st.integers(1, 64),
    quota=st.none() | st.floats(0.1, 80.0),
    busy=st.none() | st.floats(0.0, 80.0),
    local_world=st.integers(1, 8),
)


# The automatic choice ---------------------------------------------------------------------------


def test_hand_worked_choices():
    one_busy = choose_threads(Machine(2, busy=1.0), env=NO_ENV)
    assert one_busy.threads == 1 and one_busy.source == "auto"
    assert one_busy.line == "threads: 1 (2 cores usable, 1.0 busy with other processes; set --threads to override)"
    assert choose_threads(Machine(2, busy=0.1), env=NO_ENV).threads == 2  # noise on an idle machine
    assert choose_threads(Machine(2, busy=0.4), env=NO_ENV).threads == 1  # a core 40% taken is not worth a thread
    assert choose_threads(Machine(2, busy=None), env=NO_ENV).threads == 2  # unknown: all usable cores
    assert "unknown" in choose_threads(Machine(2, busy=None), env=NO_ENV).line
    quota = choose_threads(Machine(16, quota=3.5, busy=0.0), env=NO_ENV)
    assert quota.threads == 3 and "cgroup quota 3.5 of 16" in quota.line
    assert choose_threads(Machine(16, quota=0.5), env=NO_ENV).threads == 1  # half a core: still one thread
    ranks = choose_threads(Machine(8, busy=0.0, local_world=4), env=NO_ENV)
    assert ranks.threads == 2 and ranks.line.startswith("threads: 2 per process (") and "4 processes" in ranks.line
    assert choose_threads(Machine(8, busy=2.0, local_world=2), env=NO_ENV).threads == 3
    assert choose_threads(Machine(2, busy=0.0, local_world=4), env=NO_ENV).threads == 1  # never 0
    assert choose_threads(Machine(29, busy=0.0, local_world=5), env=NO_ENV).threads == 5  # 6 x 5 would be 30 > 29


@given(machines)
def test_auto_fits_the_machine(m):
    threads = choose_threads(m, env=NO_ENV).threads
    assert 1 <= threads <= max(1, m.usable // m.local_world)  # all processes together fit the usable cores
    if m.quota is not None:
        assert threads <= max(1, int(m.quota))
    if not m.busy:  # nothing else running: every process gets its full share
        assert threads == max(1, m.usable // m.local_world)


@given(machines, st.floats(0.0, 10.0))
def test_busier_never_more_threads(m, more):
    busier = Machine(m.cores, m.quota, (m.busy or 0.0) + more, m.local_world)
    assert choose_threads(busier, env=NO_ENV).threads <= choose_threads(m, env=NO_ENV).threads


# The user decides -------------------------------------------------------------------------------


def test_precedence_threads_then_moekit_then_omp():
    m = Machine(2, busy=1.5)
    env = {"MOEKIT_THREADS": "3", "OMP_NUM_THREADS": "5"}
    assert choose_threads(m, 4, env).line == "threads: 4 (--threads)"
    assert choose_threads(m, None, env).line == "threads: 3 (MOEKIT_THREADS=3)"
    assert choose_threads(m, None, {"OMP_NUM_THREADS": "5"}).line == "threads: 5 (OMP_NUM_THREADS=5)"
    assert choose_threads(m, None, {"OMP_NUM_THREADS": "4,2"}).threads == 4  # OpenMP's nested list: the outer level
    assert choose_threads(m, None, {"OMP_NUM_THREADS": "lots"}).source == "auto"  # OpenMP ignores it too


def test_torchruns_own_omp_num_threads_is_not_a_choice():
    env = {"OMP_NUM_THREADS": "1"}  # what torchrun sets for its processes when the user set nothing
    assert choose_threads(Machine(8, busy=0.0, local_world=2), None, env).threads == 4
    assert choose_threads(Machine(8, busy=0.0, local_world=1), None, env).line == "threads: 1 (OMP_NUM_THREADS=1)"
    assert choose_threads(Machine(8, busy=0.0, local_world=2), None, {"OMP_NUM_THREADS": "3"}).threads == 3


@pytest.mark.parametrize("value", ["0", "-1", "two", "", "2,1"])
def test_bad_moekit_threads_is_one_clear_error(value):
    with pytest.raises(ConfigError, match=f"MOEKIT_THREADS must be a positive integer, got {value!r}"):
        choose_threads(Machine(2), None, {"MOEKIT_THREADS": value})
    with pytest.raises(ConfigError, match="--threads must be a positive integer"):
        choose_threads(Machine(2), 0, NO_ENV)


def test_local_world_from_torchrun_env():
    assert runtime.local_world_size({}) == 1
    assert runtime.local_world_size({"WORLD_SIZE": "4"}) == 4
    assert runtime.local_world_size({"WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "2"}) == 2


# Reading the machine ----------------------------------------------------------------------------


def test_cpu_max_and_cgroup_quota(tmp_path):
    assert runtime.parse_cpu_max("max 100000\n") is None
    assert runtime.parse_cpu_max("150000 100000\n") == 1.5
    assert runtime.parse_cpu_max("garbage") is None
    assert runtime.cgroup_quota(tmp_path) is None  # no files: no quota
    (tmp_path / "cpu.max").write_text("250000 100000\n")
    assert runtime.cgroup_quota(tmp_path) == 2.5
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("50000\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert runtime.cgroup_quota(v1) == 0.5
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")  # v1's "no quota"
    assert runtime.cgroup_quota(v1) is None


def test_cpu_times_sum_the_allowed_cpus(tmp_path):
    stat = tmp_path / "stat"
    stat.write_text(
        "cpu  30 0 10 160 0 0 0 0 0 0\n"
        "cpu0 10 0 5 80 5 0 0 0 0 0\n"  # busy 15 of 100 (iowait counts as idle)
        "cpu1 20 0 5 75 0 0 0 0 0 0\n"  # busy 25 of 100
        "intr 12345\n"
    )
    assert runtime._cpu_times({0, 1}, stat) == (40.0, 200.0)
    assert runtime._cpu_times({1}, stat) == (25.0, 100.0)


def test_busy_cores_reads_this_machine():
    cpus = runtime.affinity_cores()
    busy = runtime.busy_cores(cpus, 0.05)
    assert busy is None or 0.0 <= busy <= len(cpus) + 0.5  # jiffies are coarse over 50 ms


# Applying the choice ----------------------------------------------------------------------------


def test_run_threads_sets_and_restores(monkeypatch):
    monkeypatch.setenv("MOEKIT_THREADS", "3")
    before = torch.get_num_threads()
    with runtime.run_threads() as choice:
        assert torch.get_num_threads() == 3 and runtime.applied() == choice
    assert torch.get_num_threads() == before and runtime.applied() is None


def test_one_thread_means_no_expert_pool():
    """The experts' loop runs big calls on ``torch.get_num_threads()`` workers: one thread, none;
    small calls stay in the calling thread whatever the count (see moekit/layers/expert_threads.py)."""
    seen = []
    rows_N = torch.zeros(12, 4)
    acc_TD = torch.zeros(12, 4)

    def run(experts, acc):
        seen.append(threading.current_thread())

    big = 2**14  # rows x width x D = 12 x 2^14 x 2^14: past the workers' threshold, experts still small
    acc_TD = torch.zeros(12, 2**14)
    with runtime.run_threads(1):
        _map_experts(run, [3, 3, 3, 3], big, acc_TD, rows_N)
    assert seen == [threading.main_thread()]
    with runtime.run_threads(2):
        _map_experts(run, [40, 40, 40, 40], 8, acc_TD[:, :8], torch.zeros(160, 4))  # small call: inline
        assert seen == [threading.main_thread()] * 2
        _map_experts(run, [3, 3, 3, 3], big, acc_TD, rows_N)
    assert len(seen) == 4 and threading.main_thread() not in seen[2:]


def test_train_threads_reach_torch_and_the_log(tmp_path, monkeypatch, capsys):
    """``moekit train --threads 3``: torch runs the training on 3 threads, train.log says why, and
    the process's own thread count comes back afterwards."""
    monkeypatch.setenv("MOEKIT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("MOEKIT_THREADS", raising=False)
    seen = []
    real_train = train_cli.train

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real_train(*args, **kwargs)

    monkeypatch.setattr(train_cli, "train", spy)
    before = torch.get_num_threads()
    data = tmp_path / "text.txt"
    data.write_text("def f(x):\n    return x + 1\n" * 40)
    args = ["train", "--preset", "tiny", "--data", str(data), "--steps", "1", "--quiet"]
    for kv in ("tokenizer=byte", "batch_size=2", "seq_len=16", "eval_batches=1"):
        args += ["--set", f"train.{kv}"]
    assert main([*args, "--out", str(tmp_path / "run"), "--threads", "3"]) == 0
    assert seen == [3] and torch.get_num_threads() == before
    assert "threads: 3 (--threads)" in (tmp_path / "run" / "train.log").read_text()
    monkeypatch.setenv("MOEKIT_THREADS", "2")  # the environment, when --threads is not given
    assert main([*args, "--out", str(tmp_path / "run2")]) == 0
    assert seen == [3, 2] and "threads: 2 (MOEKIT_THREADS=2)" in (tmp_path / "run2" / "train.log").read_text()
    capsys.readouterr()
    assert main([*args, "--out", str(tmp_path / "run3"), "--threads", "0"]) == 2
    assert "--threads: expected a positive integer" in capsys.readouterr().err


class FakeProc:
    """Readings for ``LoadWatch``: (busy jiffies, all jiffies, own CPU s) and a clock, stepped by hand."""

    def __init__(self):
        self.busy = self.total = self.own = self.now = 0.0

    def advance(self, seconds: float, cores_busy: float, own_cores: float, cores: int = 2, hz: float = 100.0):
        self.now += seconds
        self.total += seconds * hz * cores
        self.busy += seconds * hz * cores_busy
        self.own += seconds * own_cores

    def read(self):
        return self.busy, self.total, self.own


def test_load_watch_follows_other_processes():
    fake = FakeProc()
    machine = Machine(2, busy=0.0)
    with runtime.run_threads(2):
        start = choose_threads(machine, env=NO_ENV)  # auto: 2 threads on the idle machine
        watch = runtime.LoadWatch(start, machine, every_s=10.0, read=fake.read, clock=lambda: fake.now)
        fake.advance(5, cores_busy=2.0, own_cores=1.0)
        assert watch.check() is None  # not yet 10 s since the last reading
        fake.advance(5, cores_busy=2.0, own_cores=1.0)  # another process took a core
        line = watch.check()
        assert torch.get_num_threads() == 1
        assert line == (
            "threads: 2 -> 1 (2 cores usable, 1.0 busy with other processes; the load changed; "
            "set --threads to override)"
        )
        fake.advance(10, cores_busy=2.0, own_cores=1.0)  # still busy: no change, no line
        assert watch.check() is None and torch.get_num_threads() == 1
        fake.advance(10, cores_busy=1.0, own_cores=1.0)  # it left: only our own thread runs
        assert watch.check().startswith("threads: 1 -> 2 (2 cores usable, 0.0 busy")
        assert torch.get_num_threads() == 2


def test_load_watch_leaves_the_users_choice_alone(monkeypatch):
    fake = FakeProc()
    user = choose_threads(Machine(2), 2, NO_ENV)
    watch = runtime.LoadWatch(user, Machine(2), every_s=0.0, read=fake.read, clock=lambda: fake.now)
    fake.advance(10, cores_busy=2.0, own_cores=0.0)
    assert watch.check() is None
    monkeypatch.setenv("MOEKIT_THREADS", "2")
    with runtime.run_threads():
        assert runtime.follow_load() is None  # moekit did not choose: nothing to follow
    monkeypatch.delenv("MOEKIT_THREADS")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with runtime.run_threads(machine=Machine(4, busy=0.0, local_world=2)):
        assert runtime.follow_load() is None  # torchrun's ranks keep their first choice


PROBE = """
import sys
from moekit import runtime
print(runtime.prepare_openmp(sys.argv[1:], runtime.Machine(2, busy=float(sys.argv[-1]))))
import torch
torch.ones(1)
"""


# libgomp's spin count before a waiting thread sleeps: 0 passive, 300000 by default, 3e10 active.
@pytest.mark.parametrize(
    "argv, env, printed, spins",
    [
        (["train", "1.0"], {}, "passive", "0"),  # busy machine: passive before libgomp loads
        (["train", "0.1"], {}, "None", "300000"),  # idle: OpenMP's own default (spin a while, then sleep)
        (["params", "1.0"], {}, "None", "300000"),  # not a training command
        (["train", "1.0"], {"OMP_WAIT_POLICY": "active"}, "None", "30000000000"),  # the user's setting stays
        (["train", "1.0"], {"GOMP_SPINCOUNT": "1000"}, "None", "1000"),  # so does a tuned spin count
    ],
)
def test_wait_policy_reaches_openmp(argv, env, printed, spins):
    """libgomp's own report of its settings (OMP_DISPLAY_ENV) after ``prepare_openmp`` and ``import torch``."""
    root = Path(__file__).resolve().parents[1]
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    run_env = {**base, **env, "OMP_DISPLAY_ENV": "verbose", "PYTHONPATH": str(root)}
    done = subprocess.run([sys.executable, "-c", PROBE, *argv], env=run_env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [printed]
    assert f"GOMP_SPINCOUNT = '{spins}'" in done.stderr


def test_the_log_line_says_when_moekit_set_the_wait_policy(monkeypatch):
    monkeypatch.setattr(runtime, "_wait_policy_set", "passive")  # as prepare_openmp left it on a busy machine
    monkeypatch.setenv("OMP_WAIT_POLICY", "passive")
    monkeypatch.delenv("MOEKIT_THREADS")
    with runtime.run_threads(machine=Machine(2, busy=1.0)) as choice:
        assert choice.line == (
            "threads: 1 (2 cores usable, 1.0 busy with other processes; set --threads to override); "
            "OpenMP waits passive (busy machine)"
        )
