"""Under ZeRO-3 each rank computes only its own shard of the pruning masks, and they are exactly the masks the
gathered weights give: every pattern, both scopes, weights with many ties, a transposed layer, padded shards.

The worker (``harness/shard_masks_worker.py``) runs on 2 processes with DeepSpeed's ``zero.Init`` partitioning.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from launch import COMMUNICATION_THREADS, HARNESS_DIR, free_port, subprocess_env

pytestmark = [pytest.mark.distributed]


@pytest.fixture(scope="module")
def records(tmp_path_factory: pytest.TempPathFactory) -> list[list[dict]]:
    out_dir = tmp_path_factory.mktemp("shard_masks")
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-addr=127.0.0.1",
        f"--master-port={free_port()}", str(HARNESS_DIR / "shard_masks_worker.py"), str(out_dir),
    ]  # fmt: skip
    proc = subprocess.run(
        command, env=subprocess_env(), cwd=out_dir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        timeout=300, start_new_session=True,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:]
    for rank in range(2):  # a gloo thread alive at exit can abort a process that has finished (teardown.py)
        exit_state = json.loads(Path(out_dir, f"exit{rank}.json").read_text())
        assert not exit_state["process_group"] and not COMMUNICATION_THREADS & set(exit_state["threads"]), exit_state
    return [json.loads(Path(out_dir, f"rank{rank}.json").read_text()) for rank in range(2)]


def test_the_shard_masks_of_every_pattern_and_scope_are_the_gathered_masks(records: list[list[dict]]) -> None:
    for rank, ranks_records in enumerate(records):
        wrong = [r for r in ranks_records if not all(r["equal"].values())]
        assert not wrong, f"rank {rank}: shard masks differ from the gathered ones in {wrong}"
    runs = {(r["pattern"], r["scope"]) for r in records[0]}
    assert {("unstructured", "global"), ("unstructured", "layer"), ("2:4", "global"), ("2:4", "layer")} <= runs
    assert {("channel", "layer"), ("masks-only", "global"), ("masks-only", "layer")} <= runs


def test_the_check_covers_weights_tied_at_the_threshold(records: list[list[dict]]) -> None:
    """Rounded weights put tied magnitudes on both sides of the cut: which of them go is what the shards must agree
    on (the continuous weights have no such ties)."""
    rounded = [r for r in records[0] if r["levels"] is not None and r["pattern"] == "unstructured"]
    assert rounded and all(r["ties_at_threshold"] for r in rounded)
    assert all(r["pruned"] > 0 for r in records[0])
