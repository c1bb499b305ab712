"""SignalAt: a test callback that sends the scheduler's warning signal to its own process at a known step."""

from __future__ import annotations

import os
import signal
from typing import Any

from lightning_compress._lightning import Callback, pl


class SignalAt(Callback):
    """Sends ``signum`` to this process at the start of optimizer step ``step``, once; with ``rank``, on that global
    rank alone (the other ranks learn of it only through PreemptionCheckpoint's agreement)."""

    def __init__(self, step: int, rank: int | None = None, signum: int = signal.SIGUSR1) -> None:
        self.step, self.rank, self.signum, self.sent = step, rank, signum, False

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        if self.sent or trainer.global_step != self.step or self.rank not in (None, trainer.global_rank):
            return
        self.sent = True
        os.kill(os.getpid(), self.signum)
