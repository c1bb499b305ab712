"""Per-step cost of each callback, attributed directly: time spent inside its hooks, over the step time of that run.

Committed results (benchmarks/results/callback_hook_time.{json,md}) came from:

    .venv/bin/python benchmarks/callback_hook_time.py

Why: GradualPruning and CompressionMonitor do not change the forward/backward work (masked weights are dense
zeros), so everything they add to a step is the work inside their hooks. Timing that work inside one run avoids the
run-to-run noise of this shared machine (whole runs differ by up to 30 % on identical work, see
pruning_step_time.py), which swamps a 1-2 % effect when two runs are compared.

Setup: the reference CNN (``ImageClassifier(image_size=28)``, Adam 1e-3), real Fashion-MNIST, batch 128,
``torch.set_num_threads(1)``, 150 optimizer steps per run, the first 50 dropped. Runs, one after the other:
- ``GradualPruning(0.9, cubic, start_step=60, end_step=100, update_every=10)``: its ``on_train_batch_end`` (mask
  multiply, the 4 mask updates inside the window, logging) is timed on every step;
- ``CompressionMonitor(log_every_n_steps=1)`` with a CSVLogger: its ``on_train_batch_end`` (logging every
  ``compress/*`` figure every step) is timed;
- Lightning's ``ModelPruning`` (global L1 unstructured 90 %, pruned at the end of epoch 0 of 50 steps): the
  ``torch.nn.utils.prune`` forward pre-hooks (``weight = weight_orig * mask`` in every forward) are timed. This is a
  LOWER bound of its cost: the extra multiply in the backward pass that those hooks add is not attributed.
Reported: hook ms per step (mean over the measured steps, so mask updates are amortised), the run's median step
ms, and their ratio (1 + hook/step) as the step-time factor the callback implies.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import ModelPruning
from pytorch_lightning.loggers import CSVLogger
from torch import nn
from torch.nn.utils import prune

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import QUIET, env_markdown, environment, set_threads, write_results  # noqa: E402

from lightning_compress import CompressionMonitor, GradualPruning  # noqa: E402
from lightning_compress.data import FashionMNISTDataModule  # noqa: E402
from lightning_compress.models import ImageClassifier  # noqa: E402

STEPS, DROP = 150, 50


class StepTimer(pl.Callback):
    def __init__(self) -> None:
        self.steps: list[float] = []

    def on_train_batch_start(self, *args: Any) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self.steps.append(time.perf_counter() - self._start)


class HookClock:
    """Accumulates the time spent in wrapped callables, per optimizer step."""

    def __init__(self) -> None:
        self.per_step: list[float] = []
        self.current = 0.0

    def wrap(self, fn: Any) -> Any:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.current += time.perf_counter() - start

        return timed

    def close_step(self) -> None:
        self.per_step.append(self.current)
        self.current = 0.0


class CloseStep(pl.Callback):
    def __init__(self, clock: HookClock) -> None:
        self.clock = clock

    def on_train_batch_end(self, *args: Any) -> None:
        self.clock.close_step()


def run(config: str, data: FashionMNISTDataModule) -> dict[str, float]:
    pl.seed_everything(0, verbose=False)
    model = ImageClassifier(image_size=28)
    clock, timer = HookClock(), StepTimer()
    logger: Any = False
    if config == "GradualPruning":
        callback: pl.Callback = GradualPruning(0.9, start_step=60, end_step=100, update_every=10)
        callback.on_train_batch_end = clock.wrap(callback.on_train_batch_end)
    elif config == "CompressionMonitor":
        callback = CompressionMonitor(log_every_n_steps=1)
        callback.on_train_batch_end = clock.wrap(callback.on_train_batch_end)
        logger = CSVLogger(tempfile.mkdtemp(prefix="bench-csv-"))
    else:
        weights = [(m, "weight") for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
        callback = ModelPruning(
            "l1_unstructured",
            parameters_to_prune=weights,
            amount=0.9,
            use_global_unstructured=True,
            apply_pruning=lambda epoch: epoch == 0,
            use_lottery_ticket_hypothesis=False,
        )
    trainer = pl.Trainer(
        max_epochs=3,
        limit_train_batches=STEPS // 3,
        callbacks=[callback, CloseStep(clock), timer],
        **{**QUIET, "logger": logger},
    )
    if config == "ModelPruning":
        original = prune.BasePruningMethod.__call__
        prune.BasePruningMethod.__call__ = clock.wrap(original)  # the forward pre-hook of every pruned weight
        try:
            trainer.fit(model, datamodule=data)
        finally:
            prune.BasePruningMethod.__call__ = original
    else:
        trainer.fit(model, datamodule=data)
    hook_ms = 1e3 * statistics.fmean(clock.per_step[DROP:])
    step_ms = 1e3 * statistics.median(timer.steps[DROP:])
    return {"hook_ms_per_step": hook_ms, "median_step_ms": step_ms, "implied_factor": 1 + hook_ms / step_ms}


def main() -> None:
    set_threads(1)
    data = FashionMNISTDataModule(batch_size=128)
    results = {config: run(config, data) for config in ("GradualPruning", "CompressionMonitor", "ModelPruning")}
    command = "python benchmarks/callback_hook_time.py"
    env = environment(1)
    lines = [
        "# Per-step cost of each callback, attributed from inside one run (reference CNN, Fashion-MNIST, batch 128)",
        "",
        env_markdown(env, command).rstrip(),
        f"- {STEPS} steps per run, first {DROP} dropped; see the script's header for what each row times.",
        "",
        "| callback | hook ms per step (mean) | median step ms | implied step-time factor |",
        "|---|---|---|---|",
    ]
    for config, r in results.items():
        bound = " (lower bound: backward not attributed)" if config == "ModelPruning" else ""
        hook, step, factor = r["hook_ms_per_step"], r["median_step_ms"], r["implied_factor"]
        lines.append(f"| {config}{bound} | {hook:.3f} | {step:.2f} | {factor:.4f}x |")
    md = "\n".join(lines) + "\n"
    write_results("callback_hook_time", {"command": command, "environment": env, "results": results}, md)
    print(md)


if __name__ == "__main__":
    main()
