"""Training-step time of the reference CNN with no callback, with GradualPruning, and with Lightning's ModelPruning.

Committed results (benchmarks/results/pruning_step_time.{json,md}) came from:

    .venv/bin/python benchmarks/pruning_step_time.py

What is timed: one optimizer step = `perf_counter` from `on_train_batch_start` to `on_train_batch_end` of a timing
callback placed LAST in the callback list, so its `on_train_batch_end` runs after the pruning callback's (forward,
backward, Adam step, `self.log`, and the pruning callback's per-step work are all inside; fetching and collating the
batch is not). Reference CNN (conv32-conv64-fc128-fc10, `ImageClassifier(image_size=28)`, Adam 1e-3), real
Fashion-MNIST, batch 128, `torch.set_num_threads(1)`.

Each run is a fresh model (seed 0) and Trainer with `limit_train_batches=S` (default 50) and `max_epochs=1+M`
(default M=2):
- epoch 0 (S steps) is warm-up and is not measured; neither are the first `--drop` (10) steps of epoch 1;
- measured: the remaining M*S - drop = 90 steps (global steps S+drop+1 .. S*(1+M), i.e. 61..150 by default).

The configurations:
- (a) `none`: no callback but the timer.
- (b) `gradual`: GradualPruning(0.9, cubic, update_every=10, start_step=S+drop=60, end_step=start_step+ramp=100).
  Masks are recomputed (global magnitude ranking) after global steps 60 (sparsity 0, dropped), 70, 80, 90, 100
  (90 % reached) - 4 mask updates inside the window - and masks are multiplied into the weights after every step
  from 60 on, so the window holds 40 ramp steps (4 with a mask update) and 50 steady-state steps at 90 %.
- (c) `modelpruning`: Lightning's ModelPruning("l1_unstructured", amount=0.9, use_global_unstructured=True) over the
  same Conv/Linear weights, `apply_pruning=lambda epoch: epoch == 0` so it prunes once, at the end of the warm-up
  epoch 0: every measured step runs with its torch.nn.utils.prune forward pre-hooks active (weight = weight_orig *
  mask recomputed in every forward) at 90 % sparsity. Its one pruning computation (at that epoch end) is outside the
  window; `use_lottery_ticket_hypothesis=False` (it would only rewind weights, which does not change step cost).
- (d) `csv`: a CSVLogger and no callback: the baseline of (e).
- (e) `monitor`: the same CSVLogger plus CompressionMonitor(log_every_n_steps=1): every step logs all compress/*
  figures (the cached structure, peak memory) to the logger. Its ratio is taken against (d), so the logger's own cost
  is in both.

Interleaving, step by step: each round builds one fresh model + Trainer per configuration and fits them in threads
that take optimizer steps strictly in turn (a b c a b c ...; only one thread runs at a time, the others wait on a
condition variable; the turn is handed on in the timer's `on_train_batch_end`, so batch fetching happens inside the
owner's turn and outside its timed window). A burst of load from the shared machine's other jobs therefore hits
all three configurations within ~0.2 s of each other. The turn order is rotated each round (a b c, b c a, c a b).
(A first version interleaved whole runs - a, b, c one after the other, ~12 s each - and its per-round ratios spread
from 0.8x to 1.35x on this machine: the load changes on that time scale.) Reported: per configuration the median of
the per-round medians (and their min-max), the mean step (which also amortises the mask updates), and the ratios
(b)/(a) and (c)/(a) computed within each round, with their median and min-max.
The same is reported for the CPU time of the training thread (`time.thread_time`, same window): with one torch
thread all step work runs on that thread, and CPU time does not count the time the shared machine's other jobs
held the core, so its ratios are the less noisy ones; the wall-clock ratios are the headline the issue asks for.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import QUIET, Benchmark, fmt_spread, spread, table  # noqa: E402
from _timing import Turns, fit_in_turns, rotated  # noqa: E402
from _training import model_pruning, reference_cnn, weight_sparsity  # noqa: E402

from lightning_compress import CompressionMonitor, GradualPruning  # noqa: E402
from lightning_compress._lightning import pl  # noqa: E402
from lightning_compress.data import FashionMNISTDataModule  # noqa: E402

CONFIGS = ("none", "gradual", "modelpruning", "csv", "monitor")
LABELS = {
    "none": "(a) no callback",
    "gradual": "(b) GradualPruning 90 %",
    "modelpruning": "(c) Lightning ModelPruning 90 %",
    "csv": "(d) CSVLogger, no callback",
    "monitor": "(e) CSVLogger + CompressionMonitor logging every step",
}
#: What each configuration's ratio is taken against: the monitor against the same logger without it.
BASELINE = {"gradual": "none", "modelpruning": "none", "monitor": "csv"}
BENCHMARK = Benchmark(
    "pruning_step_time",
    __doc__,
    shared={"configs": ",".join(CONFIGS), "rounds": 10, "threads": 1},
    options={
        "drop": (10, "extra warm-up steps dropped at the start of epoch 1"),
        "steps_per_epoch": (50, "limit_train_batches (S)"),
        "measured_epochs": (2, "epochs after the warm-up epoch (M)"),
        "ramp": (40, "GradualPruning end_step - start_step (multiple of 10)"),
    },
    smoke={"rounds": 1, "steps_per_epoch": 10, "measured_epochs": 2, "drop": 2, "ramp": 10},
    choices={"configs": CONFIGS},
)


class StepTimer(pl.Callback):
    """Times every training batch (one optimizer step here) and takes turns with the other runs of the round.

    The turn is held from this run's `on_train_batch_end` wait until its next `on_train_batch_end`, so fetching the
    next batch, the step itself and all callbacks run while every other run is blocked.
    """

    def __init__(self, turns: Turns, index: int, last_step: int) -> None:
        self.turns, self.index, self.last_step = turns, index, last_step
        self.records: list[tuple[int, int, float, float]] = []  # epoch, global step, wall s, CPU s of this thread
        self._t0 = self._c0 = 0.0

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        self.turns.wait(self.index)  # returns at once except before the very first step
        self._c0 = time.thread_time()
        self._t0 = time.perf_counter()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        wall = time.perf_counter() - self._t0
        cpu = time.thread_time() - self._c0
        self.records.append((trainer.current_epoch, trainer.global_step, wall, cpu))
        finished = trainer.global_step >= self.last_step
        self.turns.pass_on(self.index, finished=finished)
        if finished:
            self.turns.wait_all_done()
        else:
            self.turns.wait(self.index)


def _pruning_callback(config: str, model: pl.LightningModule, args: argparse.Namespace) -> list[pl.Callback]:
    start = args.steps_per_epoch + args.drop
    if config == "gradual":
        return [GradualPruning(0.9, start_step=start, end_step=start + args.ramp, update_every=10, schedule="cubic")]
    if config == "monitor":
        return [CompressionMonitor(log_every_n_steps=1)]
    if config == "modelpruning":  # prunes once, at the end of the warm-up epoch 0
        return [model_pruning(model, 0.9, apply_pruning=lambda epoch: epoch == 0)]
    return []


def run_round(
    configs: list[str], order: list[int], data: list[FashionMNISTDataModule], args: argparse.Namespace
) -> dict[str, dict[str, Any]]:
    """One fresh model and Trainer per config, fitted in threads that take optimizer steps in turn (``order``)."""
    last_step = args.steps_per_epoch * (1 + args.measured_epochs)
    turns = Turns(order)
    models, trainers, timers = [], [], []
    for i, config in enumerate(configs):
        model = reference_cnn(0)
        timer = StepTimer(turns, i, last_step)
        callbacks = [*_pruning_callback(config, model, args), timer]  # timer last: runs after the pruning callback
        logger = pl.loggers.CSVLogger(tempfile.mkdtemp(prefix="bench-csv-")) if config in ("csv", "monitor") else False
        trainers.append(
            pl.Trainer(
                max_epochs=1 + args.measured_epochs,
                limit_train_batches=args.steps_per_epoch,
                callbacks=callbacks,
                **{**QUIET, "logger": logger},
            )
        )
        models.append(model)
        timers.append(timer)
    fit_in_turns(trainers, models, data, turns)
    start = args.steps_per_epoch + args.drop
    update_steps = set(range(start + 10, start + args.ramp + 1, 10))
    result = {}
    for config, model, timer in zip(configs, models, timers, strict=True):
        kept = [r for r in timer.records if r[0] >= 1][args.drop :]
        wall, cpu = [r[2] for r in kept], [r[3] for r in kept]
        result[config] = {
            "median_ms": 1e3 * statistics.median(wall),
            "mean_ms": 1e3 * statistics.fmean(wall),
            "cpu_median_ms": 1e3 * statistics.median(cpu),
            "n_steps": len(wall),
            "mask_update_steps_ms": [1e3 * r[2] for r in kept if config == "gradual" and r[1] in update_steps],
            "final_weight_sparsity": weight_sparsity(model)["overall"],
            "steps_wall_ms": [round(1e3 * t, 3) for t in wall],
        }
    return result


def main(argv: list[str] | None = None) -> None:
    run = BENCHMARK.start(argv)
    args, configs = run.args, run.items("configs")
    if args.ramp % 10 or args.drop + args.ramp >= args.measured_epochs * args.steps_per_epoch:
        run.error("--ramp must be a multiple of 10 and end inside the measured window")
    data = [FashionMNISTDataModule(batch_size=128) for _ in configs]  # one per Trainer (a DataModule holds its trainer)
    data[0].setup("fit")
    for d in data[1:]:  # loaded once, shared
        d.train_set, d.val_set = data[0].train_set, data[0].val_set
    rounds: list[dict[str, dict[str, Any]]] = []
    for r in range(args.rounds):
        order = rotated(list(range(len(configs))), r)
        result = run_round(configs, order, data, args)
        medians = ", ".join(f"{c} {result[c]['median_ms']:.2f} ms" for c in configs)
        print(f"round {r} (first: {configs[order[0]]}): {medians}", flush=True)
        rounds.append(result)
    summary = {config: _summary(config, configs, rounds) for config in configs}
    title = "Pruning: training-step time (reference CNN, Fashion-MNIST, batch 128)"
    run.finish({"summary": summary, "rounds": rounds}, title, _markdown(summary, configs, args))


def _summary(config: str, configs: list[str], rounds: list[dict[str, dict[str, Any]]]) -> dict[str, Any]:
    """One configuration over the rounds: its step times, and its ratios to its baseline within each round."""
    summary: dict[str, Any] = {
        "median_of_medians_ms": spread([rd[config]["median_ms"] for rd in rounds]),
        "mean_step_ms": spread([rd[config]["mean_ms"] for rd in rounds]),
        "cpu_median_of_medians_ms": spread([rd[config]["cpu_median_ms"] for rd in rounds]),
        "final_weight_sparsity": rounds[-1][config]["final_weight_sparsity"],
    }
    base = BASELINE.get(config)
    if base in configs:
        summary["baseline"] = base
        for key, figure in (("median", "median_ms"), ("cpu_median", "cpu_median_ms"), ("mean", "mean_ms")):
            summary[f"ratio_vs_baseline_{key}"] = spread([rd[config][figure] / rd[base][figure] for rd in rounds])
    if config == "gradual":
        updates = [t for rd in rounds for t in rd[config]["mask_update_steps_ms"]]
        summary["mask_update_step_ms"] = spread(updates) if updates else None
    return summary


def _markdown(summary: dict[str, Any], configs: list[str], args: Any) -> list[str]:
    n = summary[configs[0]]["median_of_medians_ms"]["n"]
    steps = args.measured_epochs * args.steps_per_epoch - args.drop
    rows = []
    for config in configs:
        s = summary[config]
        vs = f"x vs {LABELS[s['baseline']][:3]}" if "baseline" in s else ""
        ratio = {key: fmt_spread(s[f"ratio_vs_baseline_{key}"], 3, vs) if vs else "1 (reference)"
                 for key in ("median", "mean", "cpu_median")}  # fmt: skip
        rows.append([LABELS[config], fmt_spread(s["median_of_medians_ms"]), fmt_spread(s["mean_step_ms"]),
                     ratio["median"], ratio["mean"], f"{s['cpu_median_of_medians_ms']['median']:.2f}",
                     ratio["cpu_median"], f"{s['final_weight_sparsity']:.3f}"])  # fmt: skip
    header = ["configuration", "step ms: median of per-round medians [min-max]", "mean step ms [min-max]",
              "ratio vs its baseline, per-round medians: median [min-max]",
              "ratio vs its baseline, means: median [min-max]", "CPU ms (thread_time): median of medians",
              "CPU ratio vs its baseline: median [min-max]", "final weight sparsity"]  # fmt: skip
    lines = [
        f"- {n} interleaved rounds (order rotated each round); per run {steps} measured steps after "
        f"{args.steps_per_epoch + args.drop} warm-up steps; see the script's header for exactly what is timed.",
        "",
        *table(header, rows),
    ]
    upd = summary.get("gradual", {}).get("mask_update_step_ms")
    if upd:
        lines += [
            "",
            f"GradualPruning steps that recompute the masks: median {upd['median']:.2f} ms "
            f"[{upd['min']:.2f}-{upd['max']:.2f}] over {upd['n']} such steps ({args.ramp // 10} per run, included in "
            "the medians and means above).",
        ]
    return lines


if __name__ == "__main__":
    main()
