"""What the training benchmarks share: the two reference recipes, a timed quiet fit, test accuracy by the
benchmark's own loop, Lightning's ModelPruning as the baseline, and the measured sparsity of the weights.

The recipes (FACTS.md): the reference CNN (``ImageClassifier(image_size=28)``, Adam 1e-3) on Fashion-MNIST at batch
128; and ``MiniLMClassifier`` (AdamW 2e-5) fine-tuned on Rotten Tomatoes at batch 32, every module in train mode.
"""

from __future__ import annotations

import copy
import math
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from _common import QUIET, spread
from torch import nn

from lightning_compress._lightning import pl


def fashion_mnist(seed: int, limit_train: int | None = None) -> tuple[Any, int]:
    """The Fashion-MNIST DataModule (batch 128), set up for fit and test, and its optimizer steps per epoch."""
    from lightning_compress.data import FashionMNISTDataModule

    data = FashionMNISTDataModule(batch_size=128, seed=seed, limit_train=limit_train)
    data.setup("fit")
    data.setup("test")
    return data, math.ceil(len(data.train_set) / 128)


def reference_cnn(seed: int) -> pl.LightningModule:
    """The reference CNN for 28x28 images, initialised from ``seed``."""
    from lightning_compress.models import ImageClassifier

    pl.seed_everything(seed, verbose=False)
    return ImageClassifier(image_size=28)


def rotten_tomatoes(seed: int) -> Any:
    """The Rotten Tomatoes DataModule (batch 32, 64 tokens), every split read and tokenised."""
    from lightning_compress.data import RottenTomatoesDataModule

    data = RottenTomatoesDataModule(batch_size=32, seed=seed)
    data.setup("fit")
    return data


def minilm(seed: int) -> pl.LightningModule:
    """MiniLMClassifier, its head initialised from ``seed``, every module in train mode.

    ``from_pretrained`` hands the encoder back in eval mode and Lightning 2.x keeps submodules' modes, which would
    fine-tune with the encoder's dropout off: train every module, as a fine-tune normally does.
    """
    from lightning_compress.models import MiniLMClassifier

    pl.seed_everything(seed, verbose=False)
    return MiniLMClassifier().train()


class Progress(pl.Callback):
    """Prints the training loss every ``every`` optimizer steps."""

    def __init__(self, config: str, every: int) -> None:
        self.config, self.every, self.t0 = config, every, time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if trainer.global_step % self.every == 0:
            loss = trainer.callback_metrics.get("train/loss")
            print(
                f"[{self.config}] step {trainer.global_step} at {time.perf_counter() - self.t0:.0f} s, "
                f"train/loss {float(loss) if loss is not None else float('nan'):.3f}",
                flush=True,
            )


class StepTimes:
    """Wall time of each optimizer step: ``on_train_batch_start`` of ``begin`` to ``on_train_batch_end`` of ``end``.

    ``around(callbacks)`` puts ``begin`` first and ``end`` last, so forward, backward, optimizer step and every other
    callback's batch hooks are inside the window; fetching and collating the batch is not.
    """

    def __init__(self) -> None:
        self.times: list[float] = []
        self._t0 = 0.0
        timer = self

        class _Begin(pl.Callback):
            def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
                timer._t0 = time.perf_counter()

        class _End(pl.Callback):
            def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
                timer.times.append(time.perf_counter() - timer._t0)

        self.begin, self.end = _Begin(), _End()

    def around(self, callbacks: list[pl.Callback]) -> list[pl.Callback]:
        return [self.begin, *callbacks, self.end]

    def summary(self, skip: int) -> dict[str, float]:
        """Step ms after the first ``skip`` steps (all of them if no more were taken): spread, mean and quartiles."""
        kept = [1000 * t for t in self.times[skip:]] or [1000 * t for t in self.times]
        quartiles = statistics.quantiles(kept, n=4) if len(kept) > 1 else [kept[0]] * 3
        return {**spread(kept), "mean": statistics.fmean(kept), "q1": quartiles[0], "q3": quartiles[2]}


def fit(
    config: str, model: pl.LightningModule, data: Any, callbacks: list[pl.Callback], every: int, **trainer_args: Any
) -> tuple[float, StepTimes]:
    """Fit quietly with ``callbacks`` inside a step timer and a progress line every ``every`` steps; the wall
    seconds of the fit and the step times."""
    timer = StepTimes()
    trainer = pl.Trainer(callbacks=timer.around([*callbacks, Progress(config, every)]), **trainer_args, **QUIET)
    t0 = time.perf_counter()
    trainer.fit(model, datamodule=data)
    return time.perf_counter() - t0, timer


def detached_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` that leaves a LightningModule's Trainer behind."""
    trainer = model.__dict__.get("_trainer")
    return copy.deepcopy(model, {} if trainer is None else {id(trainer): None})


@torch.no_grad()
def evaluate(model: nn.Module, loader: Any, limit: int | None) -> dict[str, Any]:
    """Accuracy over the test loader (first ``limit`` examples if set), the predictions and the wall time."""
    model.eval()
    preds, targets, seen = [], [], 0
    t0 = time.perf_counter()
    for batch in loader:
        logits, y = model.logits_and_targets(batch)
        preds.append(logits.argmax(-1))
        targets.append(y)
        seen += len(y)
        if limit is not None and seen >= limit:
            break
    pred, target = torch.cat(preds), torch.cat(targets)
    if limit is not None:
        pred, target = pred[:limit], target[:limit]
    return {"acc": float((pred == target).float().mean()), "n": len(target), "eval_s": time.perf_counter() - t0,
            "pred": pred}  # fmt: skip


def public(evaluation: dict[str, Any]) -> dict[str, Any]:
    """An ``evaluate`` result without the predictions (for the JSON file)."""
    return {k: v for k, v in evaluation.items() if k != "pred"}


def conv_linear_weights(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """``(module, "weight")`` of every Conv2d and Linear: what the pruning benchmarks prune."""
    return [(m, "weight") for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def model_pruning(model: nn.Module, amount: float | Callable[[int], float], **options: Any) -> pl.Callback:
    """Lightning's ModelPruning, global L1 unstructured over the Conv/Linear weights, lottery-ticket rewinding off
    (it would rewind the survivors to their initial values after every prune)."""
    return pl.callbacks.ModelPruning(
        "l1_unstructured",
        parameters_to_prune=conv_linear_weights(model),
        amount=amount,
        use_global_unstructured=True,
        use_lottery_ticket_hypothesis=False,
        **options,
    )


def weight_sparsity(model: nn.Module) -> dict[str, Any]:
    """Fraction of exact zeros in every Conv/Linear ``weight`` (biases not counted), per layer and over all."""
    layers, zeros, total = {}, 0, 0
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            w = module.weight.detach()
            z = int((w == 0).sum())
            layers[name] = {"zeros": z, "numel": w.numel(), "sparsity": z / w.numel()}
            zeros, total = zeros + z, total + w.numel()
    return {"overall": zeros / total if total else 0.0, "zeros": zeros, "numel": total, "layers": layers}
