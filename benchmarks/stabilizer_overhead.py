"""Training-step time of GradientClipping (AGC, AutoClip, norm) against Lightning's own norm clipping and no clipping.

Committed results (benchmarks/results/stabilizer_overhead.{json,md}) came from:

    .venv/bin/python benchmarks/stabilizer_overhead.py --rounds 12

Setup: the reference CNN (conv32-conv64-fc128-fc10, `ImageClassifier(image_size=28)`, Adam 1e-3), real
Fashion-MNIST, batch 128, `torch.set_num_threads(1)`. The configurations:
- `none`: no clipping;
- `lightning_norm`: Lightning's `Trainer(gradient_clip_val=1.0)` (global 2-norm, `torch.nn.utils.clip_grad_norm_`
  through the precision plugin): the reference the acceptance reads against (ours <= 1.03x of it);
- `agc`: `GradientClipping(mode="agc")` (defaults: clip_factor 0.1, the last layer left alone);
- `adaptive`: `GradientClipping(mode="adaptive")` (defaults: 90th percentile of the last 100 norms);
- `ours_norm`: `GradientClipping(mode="norm", max_norm=1.0)`, the same clip as `lightning_norm` by our route.
GradientClipping logs its four `stabilize/*` figures (`self.log`) on the steps Lightning writes to the loggers
(`log_every_n_steps`, 50 by default; no logger is attached here), as in a user's run; that cost is in its figures.
(Before that, it logged every step: 1.8 ms a step, more than the clipping itself; the earlier results with the
what-if configurations that measured it are in git history.)

What is timed (pruning_step_time.py's method): one optimizer step = `perf_counter` (and `time.thread_time`, the CPU
time of the training thread, which does not count time other jobs held the core) from `on_train_batch_start` of a
timer callback placed FIRST to `on_train_batch_end` of one placed LAST: forward, backward, every
`on_before_optimizer_step` (our clipping), Lightning's clipping, the Adam step and every callback's batch-end work
(our logging) are inside; fetching the batch is not. Each round r builds one fresh model (initial weights from seed
r, shared by the configurations of the round: a trajectory-dependent cost, such as one run's weights drifting into
slow values, then differs from round to round instead of repeating in all of them) and Trainer per configuration,
`limit_train_batches=S` (50) and `max_epochs=1+M` (M=2): epoch 0 and the first `--drop` (10) steps of epoch 1 are
warm-up, the remaining M*S - drop = 90 steps are measured. The runs of a round are fitted in threads that take
optimizer steps strictly in turn (a b c d e a b c d e ...; only one thread runs at a time; the turn passes at the
timer's `on_train_batch_end`), so a burst of load on this shared machine hits every configuration within a fraction
of a second; the order is rotated each round. Reported per configuration: the median of the per-round median step
times (min-max), and ratios taken WITHIN each round (median step / median step of the reference, wall and CPU), with
their median and min-max over the rounds.

Attribution inside the same runs (callback_hook_time.py's idea: free of the run-to-run noise): the time inside our
callback's `on_before_optimizer_step` (clipping) and `on_train_batch_end` (logging its four figures with
`self.log`), and inside Lightning's `precision_plugin.clip_gradients`, per step; `implied factor` = 1 + (our hook ms
- Lightning's clip ms) / Lightning's median step ms.

Pieces (no Lightning, on the gradients of one real backward of the CNN, calls interleaved with
`_timing.interleaved_steps`, `--piece-iters` (300) turns): torch's `clip_grad_norm_` (what Lightning runs), our
`thresholds.global_norm` alone (per-tensor norms combined in float64, one host sync), and one whole
`on_before_optimizer_step` of each of our modes on a throwaway Trainer stand-in: where our step time goes.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import QUIET, Benchmark, fmt_spread, spread, table  # noqa: E402
from _timing import Turns, fit_in_turns, interleaved_steps, rotated  # noqa: E402
from _training import reference_cnn  # noqa: E402

from lightning_compress._lightning import pl  # noqa: E402
from lightning_compress.data import FashionMNISTDataModule  # noqa: E402
from lightning_compress.stabilizers import GradientClipping, thresholds  # noqa: E402

CONFIGS = ("none", "lightning_norm", "agc", "adaptive", "ours_norm")
OURS = ("agc", "adaptive", "ours_norm")
MODES = {"agc": "agc", "adaptive": "adaptive", "ours_norm": "norm"}
LABELS = {
    "none": "no clipping",
    "lightning_norm": "Lightning Trainer(gradient_clip_val=1.0)",
    "agc": "GradientClipping(mode='agc')",
    "adaptive": "GradientClipping(mode='adaptive')",
    "ours_norm": "GradientClipping(mode='norm', max_norm=1.0)",
}
BENCHMARK = Benchmark(
    "stabilizer_overhead",
    __doc__,
    shared={"configs": ",".join(CONFIGS), "rounds": 12, "threads": 1},
    options={
        "drop": (10, "extra warm-up steps dropped at the start of epoch 1"),
        "steps_per_epoch": (50, "limit_train_batches (S)"),
        "measured_epochs": (2, "epochs after the warm-up epoch (M)"),
        "piece_iters": (300, "interleaved turns of the pieces timed without Lightning"),
    },
    smoke={"rounds": 1, "steps_per_epoch": 8, "measured_epochs": 1, "drop": 2, "piece_iters": 5},
    choices={"configs": CONFIGS},
)


class Clock:
    """Time spent inside wrapped callables in the current step, per bucket (``clip``: clipping, ``log``: logging)."""

    def __init__(self) -> None:
        self.current = {"clip": 0.0, "log": 0.0}

    def wrap(self, fn: Any, bucket: str) -> Any:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.current[bucket] += time.perf_counter() - start

        return timed

    def reset(self) -> None:
        self.current = {"clip": 0.0, "log": 0.0}


class StepTimer:
    """A begin callback (first) and an end callback (last) that time each step and take turns with the other runs.

    The turn is held from this run's wait at ``on_train_batch_end`` until its next ``on_train_batch_end``, so
    fetching the next batch, the step itself and every callback run while the other runs wait.
    """

    def __init__(self, turns: Turns, index: int, last_step: int, clock: Clock) -> None:
        self.records: list[tuple[int, int, float, float, float, float]] = []  # epoch, step, wall, CPU, clip, log s
        timer = self

        class _Begin(pl.Callback):
            def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
                turns.wait(index)  # returns at once except before the very first step
                clock.reset()
                timer._c0, timer._t0 = time.thread_time(), time.perf_counter()

        class _End(pl.Callback):
            def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
                wall, cpu = time.perf_counter() - timer._t0, time.thread_time() - timer._c0
                step = (
                    trainer.current_epoch,
                    trainer.global_step,
                    wall,
                    cpu,
                    clock.current["clip"],
                    clock.current["log"],
                )
                timer.records.append(step)
                finished = trainer.global_step >= last_step
                turns.pass_on(index, finished=finished)
                if finished:
                    turns.wait_all_done()
                else:
                    turns.wait(index)

        self.begin, self.end = _Begin(), _End()
        self._t0 = self._c0 = 0.0


def _trainer(config: str, timer: StepTimer, clock: Clock, args: argparse.Namespace) -> pl.Trainer:
    """The configuration's Trainer, its clipping work wrapped by ``clock`` (instance attributes: Lightning looks
    the hooks up on the objects)."""
    callbacks: list[pl.Callback] = []
    clip_val = None
    if config == "lightning_norm":
        clip_val = 1.0
    elif config in OURS:
        clipping = GradientClipping(mode=MODES[config], max_norm=1.0)
        clipping.on_before_optimizer_step = clock.wrap(clipping.on_before_optimizer_step, "clip")
        clipping.on_train_batch_end = clock.wrap(clipping.on_train_batch_end, "log")
        callbacks.append(clipping)
    trainer = pl.Trainer(
        max_epochs=1 + args.measured_epochs,
        limit_train_batches=args.steps_per_epoch,
        callbacks=[timer.begin, *callbacks, timer.end],
        gradient_clip_val=clip_val,
        **QUIET,
    )
    plugin = trainer.precision_plugin
    plugin.clip_gradients = clock.wrap(plugin.clip_gradients, "clip")  # called only when gradient_clip_val is set
    return trainer


def run_round(
    configs: list[str], order: list[int], data: list[FashionMNISTDataModule], args: argparse.Namespace, seed: int
) -> dict[str, dict[str, Any]]:
    """One fresh model (initial weights from ``seed``, the same for every configuration) and Trainer per
    configuration, fitted in threads that take optimizer steps in turn."""
    last_step = args.steps_per_epoch * (1 + args.measured_epochs)
    turns = Turns(order)
    models, trainers, timers = [], [], []
    for i, config in enumerate(configs):
        clock = Clock()
        timer = StepTimer(turns, i, last_step, clock)
        models.append(reference_cnn(seed))
        trainers.append(_trainer(config, timer, clock, args))
        timers.append(timer)
    fit_in_turns(trainers, models, data, turns)
    result = {}
    for config, timer in zip(configs, timers, strict=True):
        kept = [r for r in timer.records if r[0] >= 1][args.drop :]
        wall, cpu, clip, log = ([1e3 * r[k] for r in kept] for k in (2, 3, 4, 5))
        result[config] = {
            "median_ms": statistics.median(wall),
            "mean_ms": statistics.fmean(wall),
            "cpu_median_ms": statistics.median(cpu),
            "hook_mean_ms": statistics.fmean(clip) + statistics.fmean(log),
            "clip_mean_ms": statistics.fmean(clip),
            "log_mean_ms": statistics.fmean(log),
            "n_steps": len(wall),
            "steps_wall_ms": [round(t, 3) for t in wall],
        }
    return result


# --------------------------------------------------------------------------------------------------- pieces


class _StandIn:
    """What GradientClipping.on_before_optimizer_step reads of a Trainer (a step, an event log that stays empty)."""

    global_step = 0


def _pieces(iters: int) -> dict[str, Any]:
    """Each clipping route alone on the gradients of one real backward of the CNN, turns interleaved."""
    model = reference_cnn(0)
    x = torch.randn(128, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    y = torch.arange(128) % 10
    F.cross_entropy(model(x), y).backward()
    params = [p for p in model.parameters() if p.requires_grad]
    grads = [p.grad for p in params]
    saved = [g.clone() for g in grads]
    stand_in = _StandIn()

    def ours(mode: str) -> GradientClipping:
        clipping = GradientClipping(mode=mode, max_norm=1.0)
        clipping._watch.start(stand_in)
        clipping._agc = clipping._agc_parameters(model) if mode == "agc" else []
        return clipping

    callbacks = {name: ours(mode) for name, mode in (("agc_hook", "agc"), ("adaptive_hook", "adaptive"),
                                                      ("norm_hook", "norm"))}  # fmt: skip
    routes = {
        "torch_clip_grad_norm_": lambda: torch.nn.utils.clip_grad_norm_(params, 1.0),
        "global_norm_only": lambda: thresholds.global_norm(grads),
        "foreach_norm_only": lambda: float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))),
        **{name: (lambda cb=cb: cb.on_before_optimizer_step(stand_in, model, None)) for name, cb in callbacks.items()},
    }

    def step(name: str) -> None:
        for g, s in zip(grads, saved, strict=True):
            g.copy_(s)  # every route clips the same gradients
        routes[name]()

    times = interleaved_steps(step, list(routes), steps=iters, warmup=3)
    restore = interleaved_steps(lambda name: [g.copy_(s) for g, s in zip(grads, saved, strict=True)], ["copy"],
                                steps=iters)["copy"]  # fmt: skip
    restore_ms = statistics.median(restore)
    return {
        "params": len(params),
        "numel": sum(p.numel() for p in params),
        "restore_gradients_median_ms": restore_ms,
        "median_ms_minus_restore": {name: statistics.median(t) - restore_ms for name, t in times.items()},
        "times_ms": times,
    }


# --------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    run = BENCHMARK.start(argv)
    args, configs = run.args, run.items("configs")
    if args.drop >= args.measured_epochs * args.steps_per_epoch:
        run.error("--drop must leave measured steps in the epochs after the warm-up epoch")
    data = [FashionMNISTDataModule(batch_size=128) for _ in configs]  # one per Trainer (a DataModule holds its trainer)
    data[0].setup("fit")
    for d in data[1:]:  # loaded once, shared
        d.train_set, d.val_set = data[0].train_set, data[0].val_set
    rounds: list[dict[str, dict[str, Any]]] = []
    for r in range(args.rounds):
        order = rotated(list(range(len(configs))), r)
        result = run_round(configs, order, data, args, seed=r)
        medians = ", ".join(f"{c} {result[c]['median_ms']:.2f} ms" for c in configs)
        print(f"round {r} (first: {configs[order[0]]}): {medians}", flush=True)
        rounds.append(result)
    summary = {config: _summary(config, configs, rounds) for config in configs}
    pieces = _pieces(args.piece_iters)
    payload = {"summary": summary, "pieces": pieces, "rounds": rounds}
    title = "Stabilisers: training-step time of gradient clipping (reference CNN, Fashion-MNIST, batch 128)"
    run.finish(payload, title, _markdown(summary, pieces, configs, args))


def _summary(config: str, configs: list[str], rounds: list[dict[str, dict[str, Any]]]) -> dict[str, Any]:
    """One configuration over the rounds: its step times, its hook time, and its ratios within each round."""
    summary: dict[str, Any] = {
        "median_of_medians_ms": spread([rd[config]["median_ms"] for rd in rounds]),
        "mean_step_ms": spread([rd[config]["mean_ms"] for rd in rounds]),
        "cpu_median_of_medians_ms": spread([rd[config]["cpu_median_ms"] for rd in rounds]),
        "hook_mean_ms": spread([rd[config]["hook_mean_ms"] for rd in rounds]),
        "clip_mean_ms": spread([rd[config]["clip_mean_ms"] for rd in rounds]),
        "log_mean_ms": spread([rd[config]["log_mean_ms"] for rd in rounds]),
    }
    for base in ("none", "lightning_norm"):
        if base in configs and base != config:
            for key, figure in (("median", "median_ms"), ("cpu_median", "cpu_median_ms"), ("mean", "mean_ms")):
                summary[f"ratio_vs_{base}_{key}"] = spread([rd[config][figure] / rd[base][figure] for rd in rounds])
    if config in OURS and "lightning_norm" in configs:
        implied = [1 + (rd[config]["hook_mean_ms"] - rd["lightning_norm"]["hook_mean_ms"])
                   / rd["lightning_norm"]["median_ms"] for rd in rounds]  # fmt: skip
        summary["implied_factor_vs_lightning_norm"] = spread(implied)
    return summary


def _markdown(summary: dict[str, Any], pieces: dict[str, Any], configs: list[str], args: Any) -> list[str]:
    n = summary[configs[0]]["median_of_medians_ms"]["n"]
    steps = args.measured_epochs * args.steps_per_epoch - args.drop
    rows = []
    for config in configs:
        s = summary[config]
        cells = []
        for base in ("lightning_norm", "none"):
            for key in ("median", "cpu_median"):
                figure = s.get(f"ratio_vs_{base}_{key}")
                cells.append(fmt_spread(figure, 3, "x") if figure else "1 (reference)" if config == base else "-")
        implied = s.get("implied_factor_vs_lightning_norm")
        implied_text = fmt_spread(implied, 4, "x") if implied else "-"
        inside = f"{s['clip_mean_ms']['median']:.3f} + {s['log_mean_ms']['median']:.3f}"
        rows.append([f"`{config}`: {LABELS[config]}", fmt_spread(s["median_of_medians_ms"]), *cells, inside,
                     implied_text])  # fmt: skip
    header = ["configuration", "step ms: median of per-round medians [min-max]",
              "ratio vs Lightning norm clip (wall): median [min-max]", "ratio vs Lightning norm clip (CPU)",
              "ratio vs no clipping (wall)", "ratio vs no clipping (CPU)",
              "ms per step inside the hooks: clipping + logging (median of rounds)",
              "implied factor vs Lightning norm clip (hook time)"]  # fmt: skip
    piece_rows = [[f"`{name}`", f"{ms:.4f}"] for name, ms in pieces["median_ms_minus_restore"].items()]
    return [
        f"- {n} interleaved rounds (order rotated each round); per run {steps} measured steps after "
        f"{args.steps_per_epoch + args.drop} warm-up steps; Adam 1e-3; see the script's header for what is timed.",
        "",
        *table(header, rows),
        "",
        f"Pieces, without Lightning ({pieces['params']} parameters, {pieces['numel']:,} weights; median ms of "
        f"{args.piece_iters} interleaved calls, minus {pieces['restore_gradients_median_ms']:.4f} ms of restoring "
        "the gradients before each):",
        "",
        *table(["route", "ms per call"], piece_rows),
    ]


if __name__ == "__main__":
    main()
