"""A distributed run that finished exits cleanly: no communication thread is alive when the interpreter finalizes.

The abort this guards against (``lightning_compress.teardown``): a gloo worker thread that releases a collective's
tensors while the interpreter finalizes is ended by CPython, and the C++ runtime aborts the process (SIGABRT, exit
-6) after a fit that succeeded. It is a race, seen in about 1 of 60 two-process ZeRO-3 fits, so these tests check the
condition that rules it out, which holds or fails every time: before finalization, every process group is destroyed
and its threads joined. ``scripts/stress_exits.py`` counts the exits themselves.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist
from launch import COMMUNICATION_THREADS, HARNESS_DIR, STRATEGIES, FitSpec, run_fit, subprocess_env

from lightning_compress.teardown import destroy_process_groups


def communication_threads(record: dict) -> set[str]:
    return COMMUNICATION_THREADS & set(record["threads"])


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("name", ["ddp", "zero3"])
def test_every_rank_of_a_finished_fit_reaches_exit_with_no_process_group_or_gloo_thread(
    name: str, tmp_path: Path
) -> None:
    """ZeRO-3 is the hard case: DeepSpeed's engine, its module stack and the ZeRO-3 parameters all hold the groups,
    so destroying them frees nothing until the harness releases the engine (``CPUDeepSpeedStrategy.release``)."""
    result = run_fit(FitSpec(**STRATEGIES[name], max_steps=4), tmp_path)
    assert len(result.exits) == 2
    for rank, record in enumerate(result.exits):
        assert not record["process_group"], f"rank {rank} still has a process group at exit"
        assert not communication_threads(record), f"rank {rank} exits with {communication_threads(record)} alive"


def run_gloo_ranks(out_dir: Path, *flags: str, world_size: int = 2) -> tuple[list[int], list[dict]]:
    """Each rank of ``gloo_exit_worker.py``: its exit code and what it recorded just before finalization."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**subprocess_env(), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(world_size)}
    command = [sys.executable, str(HARNESS_DIR / "gloo_exit_worker.py"), str(out_dir), *flags]
    logs = [(out_dir / f"rank{rank}.log").open("w") for rank in range(world_size)]
    ranks = [
        subprocess.Popen(command, env={**env, "RANK": str(rank)}, stdout=log, stderr=subprocess.STDOUT)
        for rank, log in enumerate(logs)
    ]
    codes = [rank.wait(timeout=120) for rank in ranks]
    for log in logs:
        log.close()
    return codes, [json.loads((out_dir / f"exit{rank}.json").read_text()) for rank in range(world_size)]


@pytest.mark.distributed
def test_groups_a_program_never_destroys_are_destroyed_by_the_exit_hook_before_finalization(tmp_path: Path) -> None:
    """A user's script ends after ``trainer.fit`` without destroying its gloo group. Without the hook its ranks
    reach finalization with gloo's threads alive (the control); with it, none is left."""
    (tmp_path / "plain").mkdir()
    _, records = run_gloo_ranks(tmp_path / "plain")
    assert all(communication_threads(record) for record in records), records

    (tmp_path / "hook").mkdir()
    codes, records = run_gloo_ranks(tmp_path / "hook", "--at-exit")
    assert codes == [0, 0]
    assert [communication_threads(record) for record in records] == [set(), set()]
    assert not any(record["process_group"] for record in records)


@pytest.mark.distributed
def test_a_program_that_failed_after_its_last_collective_still_reaches_finalization_with_no_gloo_thread(
    tmp_path: Path,
) -> None:
    """A failed run is as exposed to the abort as a finished one (CI once saw this program end on -6 instead of 1
    when the hook stood aside for failures), so the hook destroys its groups too and it exits with its own error."""
    codes, records = run_gloo_ranks(tmp_path, "--at-exit", "--fail")
    assert codes == [1, 1]
    assert [communication_threads(record) for record in records] == [set(), set()]
    assert not any(record["process_group"] for record in records)


def test_destroying_when_no_process_group_exists_does_nothing() -> None:
    if dist.is_initialized():
        pytest.skip("this test process has a process group")
    assert destroy_process_groups() is False


def test_asking_twice_for_the_exit_hook_runs_it_once() -> None:
    program = (
        "import lightning_compress.teardown as teardown\n"
        "teardown.destroy_process_groups = lambda: print('destroyed')\n"
        "teardown.destroy_process_groups_at_exit()\n"
        "teardown.destroy_process_groups_at_exit()\n"
    )
    ran = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, check=True, timeout=120)
    assert ran.stdout.splitlines().count("destroyed") == 1


@pytest.mark.distributed
@pytest.mark.slow
def test_a_users_own_ddp_script_with_a_compression_callback_reaches_finalization_with_no_gloo_thread(
    tmp_path: Path,
) -> None:
    """The callbacks register the exit hook at setup, so a user's script needs no teardown of its own; the same
    script without a callback (plain Lightning) is the control that still has gloo's threads at finalization."""
    records = {}
    for variant, flags in (("plain", []), ("callback", ["--callback"])):
        out = tmp_path / variant
        out.mkdir()
        command = [sys.executable, str(HARNESS_DIR / "user_ddp_script.py"), str(out), *flags]
        proc = subprocess.run(command, env=subprocess_env(), cwd=out, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        records[variant] = [json.loads((out / f"exit{rank}.json").read_text()) for rank in range(2)]
    assert any(communication_threads(record) for record in records["plain"]), records["plain"]
    assert [communication_threads(record) for record in records["callback"]] == [set(), set()]
    assert not any(record["process_group"] for record in records["callback"])
