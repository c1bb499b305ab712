"""Callbacks that look at a fit from inside the step, for the stabiliser tests: gradients before and after clipping,
the learning rate the optimizer really used, the weights after every step."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import torch

from lightning_compress._lightning import Callback, pl


class GradTap(Callback):
    """Copies every gradient in ``on_before_optimizer_step``: list one before GradientClipping and one after it
    (Lightning calls callbacks in list order), and the two hold the gradients before and after clipping."""

    def __init__(self) -> None:
        self.steps: list[dict[str, torch.Tensor | None]] = []
        self.weights: list[dict[str, torch.Tensor]] = []  # the weights the gradients were taken at

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        params = dict(pl_module.named_parameters())
        self.steps.append({n: None if p.grad is None else p.grad.detach().clone() for n, p in params.items()})
        self.weights.append({n: p.detach().clone() for n, p in params.items()})


class LrTap(Callback):
    """The learning rate of group 0 inside each optimizer update (a step pre-hook registered after every other
    callback's, so after LearningRateWarmup's factor) and after each batch (what the scheduler left)."""

    def __init__(self) -> None:
        self.used: list[float] = []
        self.after_batch: list[float] = []

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        optimizer = trainer.optimizers[0]
        optimizer.register_step_pre_hook(lambda opt, args, kwargs: self.used.append(opt.param_groups[0]["lr"]))

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self.after_batch.append(trainer.optimizers[0].param_groups[0]["lr"])


class WeightTap(Callback):
    """A copy of every weight after every batch."""

    def __init__(self) -> None:
        self.steps: list[dict[str, torch.Tensor]] = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self.steps.append({n: p.detach().clone() for n, p in pl_module.named_parameters()})


def logged(folder: Path, metric: str) -> dict[int, float]:
    """``metric`` by step from the metrics.csv a CSVLogger wrote under ``folder``."""
    (path,) = Path(folder).rglob("metrics.csv")
    with path.open() as handle:
        return {int(row["step"]): float(row[metric]) for row in csv.DictReader(handle) if row.get(metric)}
