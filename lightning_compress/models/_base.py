"""What the bundled classifiers share: cross-entropy, accuracy, the metric names they log, and a check of their
real-valued arguments (learning rate, weight decay) in the message shape of ``lightning_compress.arguments``."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.nn import functional as F
from torchmetrics.classification import MulticlassAccuracy

from lightning_compress import arguments
from lightning_compress._lightning import LightningModule


def positive_number(name: str, value: Any, *, allow_zero: bool = False, hint: str) -> float:
    """``value`` as a float if it is a finite number ``> 0`` (``>= 0`` with ``allow_zero``), else a refusal."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if number and (value >= 0 if allow_zero else value > 0):
        return float(value)
    raise arguments.refusal(name, value, f"a finite number {'>=' if allow_zero else '>'} 0", hint)


class ClassifierBase(LightningModule):
    """Logs ``train/loss``, ``val/loss``, ``val/acc``, ``test/loss`` and ``test/acc``.

    Subclasses define ``logits_and_targets(batch)``.
    """

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.val_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")

    def logits_and_targets(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        logits, y = self.logits_and_targets(batch)
        loss = F.cross_entropy(logits, y)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(y))
        return loss

    def _evaluate(self, batch: Any, stage: str, metric: MulticlassAccuracy) -> None:
        logits, y = self.logits_and_targets(batch)
        self.log(f"{stage}/loss", F.cross_entropy(logits, y), sync_dist=True, batch_size=len(y))
        metric(logits, y)
        self.log(f"{stage}/acc", metric, prog_bar=stage == "val", batch_size=len(y))

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, "val", self.val_acc)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, "test", self.test_acc)
