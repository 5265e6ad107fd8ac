"""Does a busy machine cost moekit more than the cores it takes? 20 training steps of the tiny preset,
timed in four cases, interleaved round by round:

  idle-1     idle machine, --threads 1
  idle-auto  idle machine, moekit's own choice (moekit.runtime)
  busy-auto  one core kept busy by a spinning Python process, moekit's own choice
  busy-2     the same busy core, --threads 2 forced (the old default on a 2-core machine)

Each case is a fresh ``moekit train --preset tiny --steps N --quiet`` into a temporary folder; its
time is the run's own step time (summary.json ``train_time_s``: steps only, no start-up, tokenizer,
evaluation or checkpoint writes), so a first untimed run that trains and caches the BPE tokenizer
does not count. The target: busy-auto <= 1.1 x idle-1.

    python scripts/busy_machine.py [--steps 20] [--rounds 1] [--json] [--pin]

"Idle" is only as idle as the machine is: the table says how busy the cores were (other
processes, moekit.runtime.busy_cores) before each run, and the 1-minute load average.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moekit.runtime import affinity_cores, busy_cores  # noqa: E402

CASES = {  # name: (busy core?, --threads or None for moekit's choice)
    "idle-1": (False, 1),
    "idle-auto": (False, None),
    "busy-auto": (True, None),
    "busy-2": (True, 2),
    "idle-2": (False, 2),  # not run by default: --cases idle-1,idle-2,...
}
DEFAULT_CASES = ["idle-1", "idle-auto", "busy-auto", "busy-2"]
TARGET = 1.1
SPIN = "while True:\n    pass\n"


def train_env(wait_policy: str | None) -> dict[str, str]:
    """The environment of a timed run: this repository importable, no thread settings inherited."""
    drop = ("OMP_NUM_THREADS", "MOEKIT_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    if wait_policy == "spin":  # libgomp's own default (spin 300000 rounds, then sleep), which moekit leaves alone
        env["GOMP_SPINCOUNT"] = "300000"
    elif wait_policy in ("active", "passive"):
        env["OMP_WAIT_POLICY"] = wait_policy
    return env


def train_command(out: Path, steps: int, threads: int | None, sets: list[str]) -> list[str]:
    cmd = [sys.executable, "-m", "moekit", "train", "--preset", "tiny", "--steps", str(steps), "--out", str(out)]
    cmd += ["--quiet", "--set", "train.eval_batches=1"]
    for kv in sets:
        cmd += ["--set", kv]
    return cmd + (["--threads", str(threads)] if threads else [])


@contextlib.contextmanager
def busy_core(on: bool, pin: bool):
    """A Python process spinning on one core (pinned to the last usable core with ``pin``)."""
    if not on:
        yield
        return
    cores = sorted(affinity_cores())
    pre = (lambda: os.sched_setaffinity(0, {cores[-1]})) if pin else None
    spinner = subprocess.Popen([sys.executable, "-c", SPIN], preexec_fn=pre)
    try:
        time.sleep(0.5)  # running before the timed run reads the machine
        yield
    finally:
        spinner.kill()
        spinner.wait()


def paused_seconds(proc: subprocess.Popen, every_s: float = 0.02) -> list[float]:
    """Watch ``proc`` until it exits; the returned list's one item grows by the seconds it spent
    stopped (SIGSTOP: some benchmark scripts pause every other Python process while they time)."""
    paused = [0.0]

    def watch() -> None:
        last = time.monotonic()
        while proc.poll() is None:
            time.sleep(every_s)
            now = time.monotonic()
            try:
                state = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except (OSError, IndexError):
                state = ""
            if state in ("T", "t"):
                paused[0] += now - last
            last = now

    threading.Thread(target=watch, daemon=True).start()
    return paused


def run_case(
    name: str, folder: Path, steps: int, sets: list[str], pin: bool, wait_policy: str | None, attempts: int = 3
) -> dict:
    """One timed run of case ``name``; run again (up to ``attempts``) while something paused it."""
    busy, threads = CASES[name.split("/")[0]]
    out = folder / name.replace("/", "-")
    for attempt in range(1, attempts + 1):
        with busy_core(busy, pin):
            others = busy_cores(affinity_cores())  # other processes (the spinner included) before the run
            cmd = train_command(out, steps, threads, sets + ["train.ckpt_every=100000"]) + ["--force"]
            proc = subprocess.Popen(
                cmd, env=train_env(wait_policy), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
            paused = paused_seconds(proc)
            _, stderr = proc.communicate()
        if proc.returncode != 0:
            raise SystemExit(f"busy_machine: case {name} failed (exit {proc.returncode}): {stderr.strip()[-400:]}")
        if paused[0] < 0.1:
            break
        print(
            f"busy_machine: {name} was paused {paused[0]:.1f} s by another process; attempt {attempt}", file=sys.stderr
        )
    summary = json.loads((out / "summary.json").read_text())
    log = (out / "train.log").read_text()
    line = next((ln.split(" ", 2)[2] for ln in log.splitlines() if " threads: " in ln), "")
    return {
        "case": name,
        "seconds": summary["train_time_s"],
        "threads_line": line,
        "busy_before": others,
        "paused_s": round(paused[0], 2),
    }


def summarise(runs: list[dict], steps: int) -> dict:
    """Median seconds per case over the rounds, each case's ratio to idle-1, and the verdict."""
    cases = {}
    for name in dict.fromkeys(r["case"] for r in runs):
        mine = [r for r in runs if r["case"] == name]
        if mine:
            cases[name] = {
                "seconds": statistics.median(r["seconds"] for r in mine),
                "all_seconds": [round(r["seconds"], 2) for r in mine],
                "threads": mine[-1]["threads_line"],
                "busy_before": [None if r["busy_before"] is None else round(r["busy_before"], 2) for r in mine],
                "paused_s": [r["paused_s"] for r in mine],  # > 0: another process stopped the run (all attempts)
            }

    def find(name: str) -> dict | None:  # "idle-1", else its run with the default wait policy, else any
        keys = [name, f"{name}/default", *(k for k in cases if k.startswith(f"{name}/"))]
        return next((cases[k] for k in keys if k in cases), None)

    base = (find("idle-1") or {}).get("seconds")
    for c in cases.values():
        c["vs_idle_1"] = c["seconds"] / base if base else None
    ratio = find("busy-auto")["vs_idle_1"] if find("busy-auto") and base else None
    return {
        "steps": steps,
        "cases": cases,
        "busy_auto_vs_idle_1": ratio,
        "target": TARGET,
        "meets_target": None if ratio is None else ratio <= TARGET,
    }


def table(result: dict) -> str:
    lines = [f"{'case':<17} {'seconds':>8} {'x idle-1':>8}  {'busy before':<12} {'paused':<8} threads (run's log)"]
    for name, c in result["cases"].items():
        ratio = "-" if c["vs_idle_1"] is None else f"{c['vs_idle_1']:.2f}"
        busy = ",".join("?" if b is None else f"{b:.1f}" for b in c["busy_before"])
        paused = ",".join(f"{p:.0f}" for p in c["paused_s"])
        lines.append(f"{name:<17} {c['seconds']:8.1f} {ratio:>8}  {busy:<12} {paused:<8} {c['threads']}")
    if result["busy_auto_vs_idle_1"] is not None:
        verdict = "meets" if result["meets_target"] else "misses"
        lines.append(
            f"busy-auto / idle-1 = {result['busy_auto_vs_idle_1']:.2f} ({verdict} the target <= {result['target']})"
        )
    lines.append(f"load average {result['loadavg']} at the start, {result['loadavg_end']} at the end")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=20, help="training steps per case (default 20)")
    p.add_argument("--rounds", type=int, default=1, help="rounds of the cases, interleaved; medians shown")
    p.add_argument("--cases", default=",".join(DEFAULT_CASES), help=f"comma-separated, from {', '.join(CASES)}")
    p.add_argument("--pin", action="store_true", help="pin the spinning process to the last usable core")
    p.add_argument(
        "--wait-policy",
        default="default",
        help="OpenMP waiting in the timed runs: default (moekit's choice: passive on a busy start), spin "
        "(libgomp's default), passive, active, or a comma list to compare",
    )
    p.add_argument("--set", dest="sets", action="append", default=[], help="passed to moekit train (repeatable)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    args = p.parse_args(argv)
    names = [c.strip() for c in args.cases.split(",") if c.strip()]
    if unknown := [c for c in names if c not in CASES]:
        p.error(f"unknown case {unknown[0]!r}; choose from {', '.join(CASES)}")
    policies = [w.strip() for w in args.wait_policy.split(",") if w.strip()]
    if bad := [w for w in policies if w not in ("default", "spin", "active", "passive")]:
        p.error(f"unknown --wait-policy {bad[0]!r}; choose from default, spin, active, passive")
    loadavg = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="moekit-busy-") as tmp:
        folder = Path(tmp)
        # Untimed: trains and caches the tiny preset's BPE tokenizer on first use, warms the file cache.
        warm = subprocess.run(
            train_command(folder / "warm", 1, 1, args.sets), env=train_env(None), capture_output=True, text=True
        )
        if warm.returncode != 0:
            raise SystemExit(f"busy_machine: the warm-up run failed: {warm.stderr.strip()[-400:]}")
        runs = []
        for r in range(args.rounds):
            for name in names:
                for policy in policies:
                    label = f"{name}/{policy}" if len(policies) > 1 else name
                    runs.append(run_case(label, folder, args.steps, args.sets, args.pin, policy))
                    print(f"round {r + 1}: {label} {runs[-1]['seconds']:.1f} s", file=sys.stderr)
    result = summarise(runs, args.steps)
    result.update(loadavg=round(loadavg, 2), loadavg_end=round(os.getloadavg()[0], 2), cores=len(affinity_cores()))
    result.update(pin=args.pin, wait_policy=",".join(policies), rounds=args.rounds)
    print(json.dumps(result, indent=2) if args.json else table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
