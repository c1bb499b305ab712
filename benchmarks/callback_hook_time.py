"""Per-step cost of each callback, attributed directly: time spent inside its hooks, over the step time of that run.

Committed results (benchmarks/results/callback_hook_time.{json,md}) came from:

    .venv/bin/python benchmarks/callback_hook_time.py

Why: GradualPruning and CompressionMonitor do not change the forward/backward work (masked weights are dense
zeros), so everything they add to a step is the work inside their hooks. Timing that work inside one run avoids the
run-to-run noise of this shared machine (whole runs differ by up to 30 % on identical work, see
pruning_step_time.py), which swamps a 1-2 % effect when two runs are compared.

Setup: the reference CNN (``ImageClassifier(image_size=28)``, Adam 1e-3), real Fashion-MNIST, batch 128,
``torch.set_num_threads(1)``, ``--steps`` (150) optimizer steps per run in 3 epochs, the first ``--drop`` (50)
dropped. Runs, one after the other:
- ``GradualPruning(0.9, cubic, start_step=60, end_step=100, update_every=10)`` (at 150 steps; 40 % and 2/3 of the
  steps in general): its ``on_train_batch_end`` (mask
  multiply, the 4 mask updates inside the window, logging) is timed on every step;
- ``CompressionMonitor(log_every_n_steps=1)`` with a CSVLogger: its ``on_train_batch_end`` (logging every
  ``compress/*`` figure every step) is timed;
- Lightning's ``ModelPruning`` (global L1 unstructured 90 %, pruned at the end of epoch 0): the
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

from torch.nn.utils import prune

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import QUIET, Benchmark, quiet_process, table  # noqa: E402
from _training import StepTimes, model_pruning, reference_cnn  # noqa: E402

from lightning_compress import CompressionMonitor, GradualPruning  # noqa: E402
from lightning_compress._lightning import pl  # noqa: E402
from lightning_compress.data import FashionMNISTDataModule  # noqa: E402

BENCHMARK = Benchmark(
    "callback_hook_time",
    __doc__,
    shared={"steps": 150},  # 3 epochs of steps // 3
    options={"drop": (50, "first steps of each run left out of the figures (warm-up)")},
    smoke={"steps": 30, "drop": 10},
)
CONFIGS = ("GradualPruning", "CompressionMonitor", "ModelPruning")


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


def measure(config: str, data: FashionMNISTDataModule, steps: int, drop: int) -> dict[str, float]:
    """Fit with ``config``; its hook ms per step, the median step ms and the step-time factor they imply."""
    model = reference_cnn(0)
    clock, timer = HookClock(), StepTimes()
    logger: Any = False
    if config == "GradualPruning":
        start, end = round(0.4 * steps), round(2 * steps / 3)  # 60 and 100 of 150 steps
        callback: pl.Callback = GradualPruning(0.9, start_step=start, end_step=end, update_every=10)
        callback.on_train_batch_end = clock.wrap(callback.on_train_batch_end)
    elif config == "CompressionMonitor":
        callback = CompressionMonitor(log_every_n_steps=1)
        callback.on_train_batch_end = clock.wrap(callback.on_train_batch_end)
        logger = pl.loggers.CSVLogger(tempfile.mkdtemp(prefix="bench-csv-"))
    else:
        callback = model_pruning(model, 0.9, apply_pruning=lambda epoch: epoch == 0)
    trainer = pl.Trainer(
        max_epochs=3,
        limit_train_batches=steps // 3,
        callbacks=[callback, CloseStep(clock), *timer.around([])],  # the step timer after the callback's hooks
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
    hook_ms = 1e3 * statistics.fmean(clock.per_step[drop:])
    step_ms = 1e3 * statistics.median(timer.times[drop:])
    return {"hook_ms_per_step": hook_ms, "median_step_ms": step_ms, "implied_factor": 1 + hook_ms / step_ms}


def main(argv: list[str] | None = None) -> None:
    run = BENCHMARK.start(argv)
    steps, drop = run.args.steps, run.args.drop
    if steps < 15 or not 0 <= drop < steps - 3:
        run.error("--steps must be >= 15 and --drop leave steps to measure")
    quiet_process(1)
    data = FashionMNISTDataModule(batch_size=128)
    results = {config: measure(config, data, steps, drop) for config in CONFIGS}
    rows = []
    for config, r in results.items():
        bound = " (lower bound: backward not attributed)" if config == "ModelPruning" else ""
        rows.append([f"{config}{bound}", f"{r['hook_ms_per_step']:.3f}", f"{r['median_step_ms']:.2f}",
                     f"{r['implied_factor']:.4f}x"])  # fmt: skip
    lines = [
        f"- {steps} steps per run, first {drop} dropped; see the script's header for what each row times.",
        "",
        *table(["callback", "hook ms per step (mean)", "median step ms", "implied step-time factor"], rows),
    ]
    title = "Per-step cost of each callback, attributed from inside one run (reference CNN, Fashion-MNIST, batch 128)"
    run.finish({"results": results}, title, lines, threads=1)


if __name__ == "__main__":
    main()
