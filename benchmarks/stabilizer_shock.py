"""A compression shock on Fashion-MNIST: no clipping, Lightning's gradient_clip_val, GradientClipping, re-warm.

Side by side with the same seeds and data order: no clipping, Lightning's `Trainer(gradient_clip_val=v)`,
GradientClipping (AGC, AutoClip) and LearningRateWarmup's re-warm, each after the same compression event.

Committed results (benchmarks/results/stabilizer_shock.{json,md}) came from:

    .venv/bin/python benchmarks/stabilizer_shock.py --seeds 0,1,2 --jobs 2

Setup: the reference CNN (conv32-conv64-fc128-fc10, `ImageClassifier(image_size=28)`), real Fashion-MNIST (55k
train after the DataModule's 5k validation split, batch 128), `--steps` 430 optimizer steps (one epoch), tested on
all 10k t10k images by the benchmark's own loop, `torch.set_num_threads(1)` in every process. Each seed fixes the
initial weights, the split and the data order for every configuration of that seed; every run is its own process
with --jobs > 1 (each seeds itself, so --jobs changes wall time only).

How the shocks were found (seed 0, no stabiliser, one epoch, event at step 200; test accuracy of the shocked run
against the same run without the event): one-shot pruning barely hurts this CNN under SGD (95 %: -0.9 points at lr
0.1, none at lr 0.2; 99 %: -1.1 at lr 0.1, -2.0 at lr 0.2; lr 0.3 diverges with or without an event); under Adam,
99 % one-shot pruning cost -4.5 points at lr 3e-3 (95 %: -0.7), and the loss jumps to ~2.2 (chance: 2.30). At Adam lr
1e-3 the same pruning cost -9.1 points and at 1e-2 +1.0: a higher learning rate recovers from it faster, so this
damage is lost capacity, not instability. QAT at 4 bits (w4a4) cost -0.8 points at SGD lr 0.1; at 3 bits (w3a3)
-7.2 points at lr 0.1 and -10.8 at lr 0.2, where the loss climbs for the rest of the run instead of jumping once.
The two shocks kept:
- `prune`: Adam (`--prune-lr` 3e-3, 3x the reference recipe), one-shot global magnitude pruning of the Conv/Linear
  weights to 99 % at step S: `GradualPruning(0.99, schedule="constant", start_step=S, end_step=S+1,
  update_every=1)`; the loss jumps from ~0.37 to ~2.2 at step S, the run ends ~4.5 points down.
- `qat`: SGD with momentum 0.9 (`ImageClassifier(optimizer="sgd")`, `--qat-lr` 0.1), 3-bit weights and 3-bit inputs
  switched on at step S: `QuantizationAwareTraining(3, 3, start_step=S, convert_at_fit_end=False)` (the layers
  observe their ranges from step 0); the loss rises after the switch (occasional steps with large gradients) and
  the run ends ~7 points down. (At lr 0.2 the run without any event was itself already too hot: every fixed clip of
  the sweep beat the event-free run there, so it measured learning-rate tuning rather than the shock; a re-warm
  alone diverged to NaN 18 steps after it ended, with the learning rate back at 0.2.)

Configurations (per shock; ours with their defaults unless the name says otherwise):
- `no_event`: the same optimizer and seed without the compression callback (the reference the shock is measured by).
- `none`: the shock, no stabiliser.
- `clip0.25`, `clip0.5`, `clip1`, `clip2`: Lightning's `Trainer(gradient_clip_val=v)` (global-norm clipping at v on
  every step). The pre-event gradient norm has a median of ~0.6 (SGD) and ~1.4 (Adam), so the sweep goes from
  "clips every step" to "clips only the spikes"; the best of them (by mean test accuracy over the seeds) is
  "Lightning's best fixed clip".
- `agc`: `GradientClipping(mode="agc")` (clip_factor 0.1, eps 1e-3, the last layer left alone).
- `adaptive`: `GradientClipping(mode="adaptive")` (AutoClip: 90th percentile of the last 100 norms; after a
  compression event the threshold is held at its pre-event value for 20 steps).
- `rewarm`: `LearningRateWarmup(rewarm_on=[kind])` alone (kind = "masks" or "quantize"; re-warm factor 0.1 rising
  linearly to 1 over 100 applied steps, no initial warm-up).
- `agc_rewarm`, `adaptive_rewarm`: each clipping mode with that re-warm.
- `agc0.01_paper`: AGC at the paper's clip_factor 0.01 (Brock et al. at batch 4096; GradientClipping's default
  until this benchmark showed it stalling training after the prune under Adam).
- `*_tuned`: other percentiles, to see whether the default 90 is the right one: `adaptive_p50` and `adaptive_p99`
  (AutoClip at the 50th / 99th percentile).

Measured per run (the training loss of optimizer step i is the loss of the batch that step i is computed from;
steps count from 0; `S` = `--event-step`, the first step whose forward runs on the compressed model; `K` =
`--window`, 50):
- test accuracy (%, all 10k test images; the QAT model is tested with fake quantization on, in eval mode);
- spike height = max(loss[S .. S+K-1]) / mean(loss[S-K .. S-1]): the worst loss in the K steps from the event on,
  over the mean loss of the K steps before it (per-batch losses are noisy: `no_event` shows the height of a
  window with no event, ~1.4-1.8);
- post-event loss = mean(loss[S .. S+K-1]) / mean(loss[S-K .. S-1]) (the area of the bump rather than its peak);
- the gradient norm before clipping (read in `on_before_optimizer_step` by a recorder placed first) and after it
  (after Lightning's closure returned: after any clipping, just before the update; see `Recorder`), the share of
  steps that clipping changed, overall and in the K steps from the event, and the learning rate the optimizer
  actually used (after the re-warm factor);
- the final training loss (mean of the last K steps) and whether any loss was non-finite.
Each figure is reported as the mean over the seeds with its min-max, and ours against Lightning's best fixed clip
also seed by seed (paired: same initial weights and data order). The JSON holds every run with its per-step losses
and, in the window S-K .. S+K-1, its gradient norms before and after clipping, as space-separated text (`series`;
`[float(x) for x in text.split()]`), and the learning rate at the event and its lowest value in the K steps after.
"""

from __future__ import annotations

import functools
import math
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import QUIET, Benchmark, in_processes, quiet_process, table  # noqa: E402
from _training import evaluate, public  # noqa: E402

from lightning_compress import GradualPruning, QuantizationAwareTraining  # noqa: E402
from lightning_compress import events as compression_events  # noqa: E402
from lightning_compress._lightning import pl  # noqa: E402
from lightning_compress.stabilizers import GradientClipping, LearningRateWarmup  # noqa: E402

SHOCKS = {
    "prune": {"optimizer": "adam", "kind": compression_events.MASKS, "label": "one-shot 99 % global pruning, Adam"},
    "qat": {"optimizer": "sgd", "kind": compression_events.QUANTIZE,
            "label": "QAT w3a3 switched on, SGD momentum 0.9"},
}  # fmt: skip
CLIPS = {"clip0.25": 0.25, "clip0.5": 0.5, "clip1": 1.0, "clip2": 2.0}
OURS = ("agc", "adaptive", "rewarm", "agc_rewarm", "adaptive_rewarm")
TUNED = ("agc0.01_paper", "adaptive_p50_tuned", "adaptive_p99_tuned")
CONFIGS = ("no_event", "none", *CLIPS, *OURS, *TUNED)
DEFAULT_CONFIGS = CONFIGS
BENCHMARK = Benchmark(
    "stabilizer_shock",
    __doc__,
    shared={"configs": ",".join(DEFAULT_CONFIGS), "steps": 430, "jobs": 1, "threads": 1, "limit_train": None,
            "limit_test": None},
    options={
        "shocks": (",".join(SHOCKS), "comma-separated shocks"),
        "seeds": ("0,1,2", "comma-separated seeds; each configuration runs once per seed"),
        "event_step": (200, "the optimizer step at which the compression event happens (S)"),
        "window": (50, "steps before and after the event that the spike figures read (K)"),
        "prune_lr": (3e-3, "Adam's learning rate in the prune shock"),
        "qat_lr": (0.1, "SGD's learning rate in the qat shock"),
    },
    smoke={"steps": 16, "event_step": 8, "window": 4, "seeds": "0", "limit_train": 1024, "limit_test": 512},
    choices={"configs": CONFIGS, "shocks": tuple(SHOCKS)},
)  # fmt: skip


class Recorder(pl.Callback):
    """Per optimizer step: the training loss, the gradient norm before clipping (``on_before_optimizer_step``; the
    recorder is the first callback) and after it, and the learning rate the update used.

    Lightning runs forward, backward, ``on_before_optimizer_step`` and its own clipping inside the closure it hands
    to ``optimizer.step``, and torch's step pre-hooks run before that closure; so the recorder's pre-hook (registered
    after LearningRateWarmup's, which has then scaled the learning rate) wraps the closure and reads the gradients
    and the learning rate after it returned: after every clipping, just before the update.
    """

    def __init__(self) -> None:
        self.loss: list[float] = []
        self.norm_before: list[float] = []
        self.norm_after: list[float] = []
        self.lr: list[float] = []
        self._handle: Any = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._handle = trainer.optimizers[0].register_step_pre_hook(self._wrap_closure)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._handle.remove()

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        self.norm_before.append(_grad_norm(pl_module.parameters()))

    def _wrap_closure(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> tuple[Any, Any]:
        closure = kwargs["closure"]

        def recorded() -> Any:
            result = closure()
            self.norm_after.append(_grad_norm(p for g in optimizer.param_groups for p in g["params"]))
            self.lr.append(optimizer.param_groups[0]["lr"])
            return result

        return args, {**kwargs, "closure": recorded}

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, *args: Any) -> None:
        self.loss.append(float(outputs["loss"]))


def _text(values: list[float]) -> str:
    """A per-step series as space-separated numbers (4 significant digits): the JSON file stays small."""
    return " ".join(f"{x:.4g}" for x in values)


def _grad_norm(params: Any) -> float:
    grads = [p.grad for p in params if p.grad is not None]
    return math.sqrt(sum(float(g.double().square().sum()) for g in grads)) if grads else 0.0


@functools.cache
def _datasets(seed: int, limit_train: int | None) -> tuple[Any, Any]:
    """The train and test sets of ``seed``'s split, read once per process."""
    from lightning_compress.data import FashionMNISTDataModule

    data = FashionMNISTDataModule(batch_size=128, seed=seed, limit_train=limit_train)
    data.setup("fit")
    data.setup("test")
    return data.train_set, data.test_set


def _data(seed: int, limit_train: int | None) -> Any:
    """A fresh DataModule (one per Trainer) on the sets of ``seed``; its shuffle is a function of (seed, epoch)."""
    from lightning_compress.data import FashionMNISTDataModule

    data = FashionMNISTDataModule(batch_size=128, seed=seed, limit_train=limit_train)
    data.train_set, data.test_set = _datasets(seed, limit_train)
    return data


def callbacks_of(config: str, shock: str, event_step: int) -> tuple[list[pl.Callback], dict[str, Any]]:
    """The compression callback of ``shock`` (none for ``no_event``), then the stabilisers of ``config``; and the
    Trainer arguments (Lightning's clipping)."""
    kind = SHOCKS[shock]["kind"]
    callbacks: list[pl.Callback] = []
    if config != "no_event":
        if shock == "prune":
            callbacks.append(GradualPruning(0.99, schedule="constant", start_step=event_step,
                                            end_step=event_step + 1, update_every=1))  # fmt: skip
        else:
            callbacks.append(QuantizationAwareTraining(3, 3, start_step=event_step, convert_at_fit_end=False))
    if config in CLIPS:
        return callbacks, {"gradient_clip_val": CLIPS[config]}
    name = config.removesuffix("_tuned")
    clipping = {
        "agc": dict(mode="agc"), "adaptive": dict(mode="adaptive"),
        "agc0.01_paper": dict(mode="agc", clip_factor=0.01),
        "adaptive_p50": dict(mode="adaptive", percentile=50.0), "adaptive_p99": dict(mode="adaptive", percentile=99.0),
    }  # fmt: skip
    mode = name.removesuffix("_rewarm")
    if mode in clipping:
        callbacks.append(GradientClipping(**clipping[mode]))
    if name.endswith("rewarm"):
        callbacks.append(LearningRateWarmup(rewarm_on=[kind]))
    return callbacks, {}


def run_config(shock: str, config: str, seed: int, args: dict[str, Any]) -> dict[str, Any]:
    quiet_process(args["threads"])
    spec = SHOCKS[shock]
    data = _data(seed, args["limit_train"])
    pl.seed_everything(seed, verbose=False)
    from lightning_compress.models import ImageClassifier

    model = ImageClassifier(image_size=28, optimizer=spec["optimizer"], lr=args[f"{shock}_lr"])
    S, K = args["event_step"], args["window"]
    callbacks, trainer_args = callbacks_of(config, shock, S)
    recorder = Recorder()
    trainer = pl.Trainer(max_steps=args["steps"], callbacks=[recorder, *callbacks], **trainer_args, **QUIET)
    trainer.fit(model, datamodule=data)
    event_steps = [e.step for e in compression_events.history(trainer)]
    test = evaluate(model, data.test_dataloader(), args["limit_test"])
    loss, before, after = recorder.loss, recorder.norm_before, recorder.norm_after
    pre = statistics.fmean(loss[S - K : S])
    changed = [abs(a - b) > 1e-6 * max(b, 1e-12) for a, b in zip(after, before, strict=True)]
    result = {
        "shock": shock, "config": config, "seed": seed, "callbacks": [type(c).__name__ for c in callbacks],
        "trainer_args": trainer_args, "event_steps": event_steps, "test": public(test),
        "test_acc": test["acc"], "pre_event_loss": pre,
        "spike_height": max(loss[S : S + K]) / pre,
        "post_event_loss_ratio": statistics.fmean(loss[S : S + K]) / pre,
        "loss_at_event": loss[S], "final_train_loss": statistics.fmean(loss[-K:]),
        "nonfinite_loss": not all(math.isfinite(x) for x in loss),
        "pre_event_grad_norm_median": statistics.median(before[S - K : S]),
        "post_event_grad_norm_max": max(before[S : S + K]),
        "clipped_share": sum(changed) / len(changed), "clipped_share_after_event": sum(changed[S : S + K]) / K,
        "lr_at_event": recorder.lr[S], "lr_min_after_event": min(recorder.lr[S : S + K]),
        "series": {"loss": _text(loss), "window_first_step": S - K,
                   "window_grad_norm_before_clip": _text(before[S - K : S + K]),
                   "window_grad_norm_after_clip": _text(after[S - K : S + K])},
    }  # fmt: skip
    print(f"[{shock}/{config}/seed {seed}] test acc {100 * test['acc']:.2f} %, spike {result['spike_height']:.2f}, "
          f"clipped {100 * result['clipped_share']:.0f} %", flush=True)  # fmt: skip
    return result


def main(argv: list[str] | None = None) -> None:
    run = BENCHMARK.start(argv)
    args = run.args
    seeds = [int(s) for s in args.seeds.split(",") if s]
    if not (0 < args.window <= args.event_step and args.event_step + args.window <= args.steps):
        run.error("--window must be > 0 and fit before and after --event-step inside --steps")
    shocks, configs = run.items("shocks"), run.items("configs")
    tasks = [(shock, config, seed, run.settings) for shock in shocks for seed in seeds for config in configs]
    results = in_processes(run_config, tasks, args.jobs)
    summary = {shock: _summary([r for r in results if r["shock"] == shock], configs) for shock in shocks}
    verdicts = {shock: _verdict(summary[shock]) for shock in shocks}
    payload = {"wall_s": run.wall_s(), "summary": summary, "verdicts": verdicts, "runs": results}
    title = "Stabilisers: a compression shock on Fashion-MNIST (reference CNN)"
    run.finish(payload, title, _markdown(summary, verdicts, shocks, configs, seeds, args, run.wall_s()))


FIGURES = ("test_acc", "spike_height", "post_event_loss_ratio", "final_train_loss", "clipped_share",
           "clipped_share_after_event", "pre_event_grad_norm_median", "post_event_grad_norm_max")  # fmt: skip


def _summary(results: list[dict[str, Any]], configs: list[str]) -> dict[str, Any]:
    """Per configuration, each figure's mean, min, max and per-seed values."""
    out: dict[str, Any] = {}
    for config in configs:
        runs = [r for r in results if r["config"] == config]
        out[config] = {
            figure: {"mean": statistics.fmean(v), "min": min(v), "max": max(v), "values": v}
            for figure in FIGURES
            for v in [[float(r[figure]) for r in runs]]
        }
        out[config]["nonfinite_runs"] = sum(r["nonfinite_loss"] for r in runs)
    return out


def _verdict(summary: dict[str, Any]) -> dict[str, Any]:
    """Lightning's best fixed clip (by mean test accuracy) against each of ours that ran."""
    clips = [c for c in CLIPS if c in summary]
    ours = [c for c in (*OURS, *TUNED) if c in summary]
    if not clips:
        return {}
    best = max(clips, key=lambda c: summary[c]["test_acc"]["mean"])
    acc = {c: summary[c]["test_acc"]["mean"] for c in ours}
    verdict: dict[str, Any] = {"best_lightning_clip": best, "best_lightning_acc": summary[best]["test_acc"]["mean"]}
    verdict["ours"] = {
        c: {
            "acc_minus_best_clip_points": 100 * (a - verdict["best_lightning_acc"]),
            "beats_best_clip": a > verdict["best_lightning_acc"],
            "per_seed_minus_best_clip_points": _paired(summary, c, best),
        }
        for c, a in acc.items()
    }
    if "none" in summary:
        verdict["vs_none_points"] = {c: 100 * (summary[c]["test_acc"]["mean"] - summary["none"]["test_acc"]["mean"])
                                     for c in [*clips, *ours]}  # fmt: skip
    if ours:
        verdict["best_of_ours"] = max(ours, key=lambda c: acc[c])
    return verdict


def _paired(summary: dict[str, Any], config: str, other: str) -> list[float]:
    """Per seed (same initial weights and data order), the test accuracy of ``config`` minus ``other``'s, points."""
    pairs = zip(summary[config]["test_acc"]["values"], summary[other]["test_acc"]["values"], strict=True)
    return [round(100 * (a - b), 2) for a, b in pairs]


def _fmt(s: dict[str, float], scale: float = 1.0, digits: int = 2) -> str:
    return f"{scale * s['mean']:.{digits}f} [{scale * s['min']:.{digits}f}-{scale * s['max']:.{digits}f}]"


def _markdown(
    summary: dict[str, Any], verdicts: dict[str, Any], shocks: list[str], configs: list[str], seeds: list[int],
    args: Any, wall_s: float,
) -> list[str]:  # fmt: skip
    tested = "all 10k test images" if args.limit_test is None else f"the first {args.limit_test} test images"
    lines = [
        f"- {args.steps} optimizer steps (batch 128), event at step S={args.event_step}, window K={args.window}, "
        f"seeds {','.join(map(str, seeds))}, {tested}"
        f"{'' if args.limit_train is None else f', training set cut to {args.limit_train}'}; "
        f"wall time {wall_s / 60:.1f} min with --jobs {args.jobs}",
        "- each cell: mean over the seeds [min-max]; spike = max loss in steps S..S+K-1 / mean loss in S-K..S-1; "
        "post-event = mean loss in S..S+K-1 / the same pre-event mean; clipped = share of steps whose gradient "
        "clipping changed (all steps / the K steps from the event)",
    ]
    header = ["configuration", "test acc %", "vs none (points)", "spike height", "post-event loss", "final train loss",
              "clipped % (all / after event)", "grad norm: pre-event median / post-event max"]  # fmt: skip
    for shock in shocks:
        s = summary[shock]
        base = s["none"]["test_acc"]["mean"] if "none" in s else None
        rows = []
        for config in configs:
            c = s[config]
            delta = "-" if base is None else f"{100 * (c['test_acc']['mean'] - base):+.2f}"
            rows.append([config, _fmt(c["test_acc"], 100), delta, _fmt(c["spike_height"]),
                         _fmt(c["post_event_loss_ratio"]), _fmt(c["final_train_loss"], digits=3),
                         f"{100 * c['clipped_share']['mean']:.0f} / {100 * c['clipped_share_after_event']['mean']:.0f}",
                         f"{c['pre_event_grad_norm_median']['mean']:.2f} / {c['post_event_grad_norm_max']['mean']:.2f}"
                         + (f" ({c['nonfinite_runs']} runs non-finite)" if c["nonfinite_runs"] else "")])  # fmt: skip
        lr = getattr(args, f"{shock}_lr")
        lines += ["", f"## `{shock}`: {SHOCKS[shock]['label']}, lr {lr:g}", "", *table(header, rows)]
        v = verdicts[shock]
        if v.get("best_of_ours"):
            mine = v["best_of_ours"]
            paired = ", ".join(f"{d:+.2f}" for d in v["ours"][mine]["per_seed_minus_best_clip_points"])
            gap = v["ours"][mine]["acc_minus_best_clip_points"]
            lines += ["", f"**Best of ours: `{mine}`, {gap:+.2f} points against Lightning's best fixed clip "
                      f"`{v['best_lightning_clip']}` (per seed: {paired}).**"]  # fmt: skip
        if v:
            best = f"Lightning's best fixed clip: `{v['best_lightning_clip']}` ({100 * v['best_lightning_acc']:.2f} %)."
            ours = "; ".join(f"`{c}` {o['acc_minus_best_clip_points']:+.2f} points "
                             f"({'beats it' if o['beats_best_clip'] else 'does not beat it'})"
                             for c, o in v["ours"].items())  # fmt: skip
            lines += ["", best + (f" Ours against it (mean test accuracy): {ours}." if ours else "")]
    return lines


if __name__ == "__main__":
    main()
