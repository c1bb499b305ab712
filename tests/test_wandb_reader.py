"""The harness's reader of offline W&B logs reads a finished run whole, and never takes a log wandb-core has not yet
flushed for a finished one: a run smaller than one 32 KiB block is only its header on disk until the stream closes,
which can come after ``wandb.finish()`` has returned."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from wandb_reader import HEADER, _payloads, find_run_dir, read_run

RUN = """
import wandb
run = wandb.init(mode="offline", project="lightning-compress-test", dir={dir!r})
for step in range(3):
    run.log({{"loss": 1.0 / (step + 1)}})
run.summary.update({{"final/accuracy": 0.9}})
wandb.finish()
"""


@pytest.fixture(scope="module")
def finished_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("wandb")
    env = {**os.environ, "WANDB_SILENT": "true", "WANDB_MODE": "offline"}
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        (folder / var.lower()).mkdir()
        env[var] = str(folder / var.lower())
    subprocess.run([sys.executable, "-c", RUN.format(dir=str(folder))], env=env, check=True, timeout=120)
    return find_run_dir(folder)


def test_a_finished_run_is_read_whole(finished_log: Path) -> None:
    run = read_run(finished_log)
    assert [row["loss"] for row in run.history] == pytest.approx([1.0, 0.5, 1 / 3])
    assert run.summary["final/accuracy"] == 0.9


def test_a_log_holding_only_its_header_is_not_taken_for_a_finished_run(finished_log: Path, tmp_path: Path) -> None:
    (log_file,) = finished_log.glob("run-*.wandb")
    unflushed = tmp_path / "offline-run-unflushed"
    unflushed.mkdir()
    (unflushed / log_file.name).write_bytes(log_file.read_bytes()[: HEADER.size])
    with pytest.raises(AssertionError, match="no exit record"):
        read_run(unflushed, timeout_s=0.3)


def test_a_record_cut_short_by_the_writer_is_left_out_not_misread(finished_log: Path) -> None:
    (log_file,) = finished_log.glob("run-*.wandb")
    data = log_file.read_bytes()
    whole = _payloads(data)
    for cut in range(HEADER.size, len(data), max(1, len(data) // 97)):
        prefix = _payloads(data[:cut])
        assert prefix == whole[: len(prefix)], cut
    assert len(_payloads(data[: len(data) // 2])) < len(whole)
