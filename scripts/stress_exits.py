"""Stress the exit path of finished distributed fits: does every rank of every 2-process fit exit 0?

    .venv/bin/python scripts/stress_exits.py                          # 30 ZeRO-3 fits, then 30 DDP fits
    .venv/bin/python scripts/stress_exits.py -n 10 --strategies zero1 zero3 --recipe my_recipe.yaml --max-steps 24

What it measures: N consecutive fits per strategy, each a fresh process tree started exactly as the tests start one
(``tests/harness/launch.worker_command``: rank 0 runs ``fit_worker.py``; Lightning's launcher starts rank 1 as its
child), and whether every process of every tree exited 0. The abort it looks for comes after training, during
interpreter exit (``lightning_compress/teardown.py``), so a fit that trained and saved everything still counts as
failed when one of its processes exited non-zero. The harness's rank 0 waits for the ranks it started and exits 1
when one failed (its log names the code); this script also makes itself a child subreaper, so a rank that outlives
rank 0 all the same is re-parented to it and reaped here, its code listed after rank 0's.
It reports, per strategy, how many fits had a non-zero process, their exit codes (negative: killed by that signal,
-6 = SIGABRT) and the tail of each failing log. Exit status: 0 when all fits were clean, 1 otherwise.
~10-20 s per fit on 2 cores (30 + 30 fits: about 15 minutes). Not a CI test.

``--core`` lifts the core-size limit for the fits (cores land in each fit's folder, for ``gdb python CORE``);
``--faulthandler`` sets PYTHONFAULTHANDLER=1 so a fatal signal prints every Python thread's stack into the log.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "harness"))
from launch import STRATEGIES, FitSpec, subprocess_env, worker_command  # noqa: E402

PR_SET_CHILD_SUBREAPER = 36  # linux/prctl.h
TAIL_CHARS = 3000


@dataclass
class Exit:
    """How one fit's process tree ended: rank 0's exit code, then every other process's reaped here."""

    rank0: int
    others: list[int]
    seconds: float
    log: Path

    @property
    def clean(self) -> bool:
        return self.rank0 == 0 and all(code == 0 for code in self.others)

    def codes(self) -> str:
        """Every exit code, rank 0's first; a negative one names its signal (-6 (SIGABRT))."""
        return ", ".join(f"{c} ({signal.Signals(-c).name})" if c < 0 else str(c) for c in [self.rank0, *self.others])


def become_subreaper() -> None:
    """Orphaned descendants (rank 1 once rank 0 has exited) are re-parented to this process, so it can reap them."""
    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER) failed; this script needs Linux")


def reap_orphans(deadline: float, group: int) -> list[int]:
    """Wait for every remaining descendant; past ``deadline``, SIGKILL the fit's process group (reported as -9)."""
    codes: list[int] = []
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return codes
        if pid:
            codes.append(os.waitstatus_to_exitcode(status))
        elif time.monotonic() > deadline:
            os.killpg(group, signal.SIGKILL)
            deadline = float("inf")
        else:
            time.sleep(0.05)


def run_one(spec: FitSpec, out_dir: Path, timeout: float, core: bool, faulthandler: bool) -> Exit:
    env = subprocess_env()
    if faulthandler:
        env["PYTHONFAULTHANDLER"] = "1"
    lift_core = (lambda: resource.setrlimit(resource.RLIMIT_CORE, (-1, -1))) if core else None
    command = worker_command(spec, out_dir)  # makes out_dir
    log = out_dir / "fit.log"
    start = time.monotonic()
    with log.open("w") as sink:
        proc = subprocess.Popen(
            command,
            env=env,
            cwd=out_dir,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: a timeout kills the whole tree
            preexec_fn=lift_core,
        )
        try:
            rank0 = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            rank0 = proc.wait()
        others = reap_orphans(start + timeout + 60, proc.pid)
    return Exit(rank0=rank0, others=others, seconds=time.monotonic() - start, log=log)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=30, help="fits per strategy (default 30)")
    parser.add_argument("--strategies", nargs="+", default=["zero3", "ddp"], choices=list(STRATEGIES))
    parser.add_argument("--recipe", type=Path, default=None, help="a recipe (trainer.callbacks) for every fit")
    parser.add_argument("--max-steps", type=int, default=6)
    parser.add_argument("--out", type=Path, default=None, help="folder for the fits (default: a new temp folder)")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per fit before its tree is killed")
    parser.add_argument("--core", action="store_true", help="let aborting processes write core files")
    parser.add_argument("--faulthandler", action="store_true", help="PYTHONFAULTHANDLER=1 in every process")
    args = parser.parse_args(argv)
    out = args.out or Path(tempfile.mkdtemp(prefix="stress_exits_"))
    recipe = str(args.recipe.resolve()) if args.recipe else None
    become_subreaper()
    print(f"fits in {out}", flush=True)
    failures: dict[str, list[tuple[int, Exit]]] = {}
    for name in args.strategies:
        spec = FitSpec(**STRATEGIES[name], max_steps=args.max_steps, recipe=recipe)
        failures[name] = []
        for i in range(args.n):
            result = run_one(spec, out / f"{name}_{i:03d}", args.timeout, args.core, args.faulthandler)
            verdict = "ok" if result.clean else "FAILED"
            print(f"{name} {i + 1}/{args.n}: {verdict} [{result.codes()}] {result.seconds:.0f}s", flush=True)
            if not result.clean:
                failures[name].append((i, result))
    print("\nsummary")
    for name, failed in failures.items():
        print(f"  {name}: {args.n - len(failed)}/{args.n} clean, {len(failed)} exited non-zero")
        for i, result in failed:
            print(f"\n--- {name} fit {i}: exit codes [{result.codes()}], log {result.log}; tail:")
            print(result.log.read_text()[-TAIL_CHARS:])
    return 1 if any(failures.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
