"""A test-only callback that a SLURM job loads (``--trainer.callbacks+=slurm_probe.RankReport``, with tests/harness
on ``PYTHONPATH``): it reports what each rank saw, and can hold the first run at a step until the preemption signal
has arrived, so a test can preempt at a known step without racing the training.

Every rank writes ``<default_root_dir>/rank<global rank>-run<SLURM_RESTART_COUNT>.json`` at train end or when the
fit is preempted (teardown): world size, node rank, the step the run started and ended at, and rank 0 the final
weights (``final.pt``).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import torch

from lightning_compress import PreemptionCheckpoint
from lightning_compress._lightning import Callback, pl


class RankReport(Callback):
    def __init__(self, hold_at_step: int | None = None, hold_timeout_s: float = 120.0) -> None:
        self.hold_at_step = hold_at_step
        self.hold_timeout_s = hold_timeout_s
        self.restart = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
        self.report: dict[str, Any] = {}

    def _path(self, trainer: pl.Trainer, name: str) -> Path:
        return Path(trainer.default_root_dir) / name

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.report = {
            "world_size": trainer.world_size,
            "global_rank": trainer.global_rank,
            "node_rank": trainer.node_rank,
            "num_nodes": trainer.num_nodes,
            "slurm_node": os.environ.get("SLURMD_NODENAME"),
            "restart": self.restart,
            "start_step": trainer.global_step,
        }

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        if self.restart > 0 or trainer.global_step != self.hold_at_step:
            return
        preemption = next(cb for cb in trainer.callbacks if isinstance(cb, PreemptionCheckpoint))
        self._path(trainer, f"holding-rank{trainer.global_rank}").write_text(str(trainer.global_step))
        deadline = time.monotonic() + self.hold_timeout_s
        while not preemption.requested:  # the test sends the signal once every rank holds here
            if time.monotonic() > deadline:
                raise RuntimeError(f"no preemption signal within {self.hold_timeout_s} s at step {self.hold_at_step}")
            time.sleep(0.05)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        weights = [p for name, p in pl_module.named_parameters() if name.endswith("weight") and p.dim() > 1]
        zeros = sum(int((w == 0).sum()) for w in weights)
        self.report["weight_sparsity"] = zeros / sum(w.numel() for w in weights)
        if trainer.is_global_zero:
            torch.save(pl_module.state_dict(), self._path(trainer, "final.pt"))
        self._write(trainer, "end")

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and "end_step" not in self.report and self.report:
            self._write(trainer, "teardown")

    def _write(self, trainer: pl.Trainer, at: str) -> None:
        self.report.update(end_step=trainer.global_step, at=at)
        name = f"rank{trainer.global_rank}-run{self.restart}.json"
        self._path(trainer, name).write_text(json.dumps(self.report))
