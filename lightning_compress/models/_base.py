"""What the bundled classifiers share: cross-entropy, accuracy and the metric names they log."""

from __future__ import annotations

from typing import Any

import torch
from torch.nn import functional as F
from torchmetrics.classification import MulticlassAccuracy

from lightning_compress._lightning import LightningModule


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
