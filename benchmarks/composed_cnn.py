"""Pruning + int8 QAT + stabilisers in one run, against dense: test accuracy, export size and int8 CPU latency.

Committed results (benchmarks/results/composed_cnn.{json,md}) came from:

    .venv/bin/python benchmarks/composed_cnn.py --configs dense,composed,composed_nostab --seeds 0,1 --jobs 2

Setup = the FACTS.md reference of pruning_accuracy.py and qat_accuracy.py: the reference CNN (conv32-conv64-fc128-
fc10, `ImageClassifier(image_size=28)`), Adam 1e-3, batch 128, real Fashion-MNIST (55k train after the DataModule's
5k validation split; test = the 10k t10k images), 4 epochs x 430 steps, no validation during fit,
`torch.set_num_threads(1)` in every process. Every configuration is seeded on its own (same initial weights and data
order), so --jobs changes wall time only.

Configurations:
- `dense`: no callback; the fp32 reference.
- `composed`: the callbacks of `--recipe` (default recipes/fashion_mnist_prune_qat_stabilized.yaml), read with
  `load_recipe` (its ModelCheckpoint left out: the benchmark writes no checkpoints): GradualPruning to 90 % (global,
  cubic, steps 200-1200), QuantizationAwareTraining(8, 8) (start 200, observers frozen at 1300), GradientClipping
  (adaptive) and LearningRateWarmup (a 50-step re-warm after QAT switches on). The recipe's step
  arguments are scaled by (this run's optimizer steps) / (the recipe's max_epochs x 430), which is 1 for the committed
  run (the recipe as written) and shrinks the schedule into a shorter run (--epochs 2, --smoke).
- `composed_nostab`: the same recipe without GradientClipping and LearningRateWarmup: what the stabilisers change.

Measured, per configuration and seed:
- test accuracy by the benchmark's own loop (eval mode, argmax): of the trained model (for the compressed runs the QAT
  model, fake quantization on) and of the int8 model `convert_to_int8` made at fit end (`QuantizationAwareTraining.
  int8_model`), which is the one compared against dense; and the share of test images on which the int8 model predicts
  what the QAT model predicts;
- file sizes: the dense model's `torch.save(model.state_dict())` (the usual fp32 file) against `save_compressed` of the
  int8 model (sparse int8 weights as a 1-bit mask + 1 byte per non-zero, float biases and scales); the export is
  reloaded with `load_compressed` (no skeleton: the model is rebuilt from the file) and tested again;
- weight sparsity (GradualPruning's masks, and the exact zeros of the int8 weights, per layer);
- how often the stabilisers acted (steps clipped, steps with a learning-rate factor below 1, events seen).

Latency (first seed only): the dense fp32 model loaded from its file against the int8 model loaded from its export, one
forward of a batch of 256 t10k images per call, `torch.inference_mode`, 1 thread, interleaved turn by turn with the
order rotated per round (benchmarks/_timing.py). Headline: fp32 / int8 from each round's mean latencies (int8_speed.py's
choice: the ratio of medians overstates speed-ups under load). The int8 model runs dense oneDNN int8 kernels: the
zeros make the file small, not the arithmetic cheaper.

Acceptance (issue 13): int8 accuracy within 1.0 point of dense, export <= 1/15 of the dense fp32 file.
"""

from __future__ import annotations

import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, Benchmark, fmt_spread, in_processes, quiet_process, table  # noqa: E402
from _timing import interleaved, latency_summary, ratio  # noqa: E402
from _training import evaluate, fashion_mnist, fit, public, reference_cnn  # noqa: E402

from lightning_compress import GradualPruning, QuantizationAwareTraining, load_compressed, load_recipe  # noqa: E402
from lightning_compress._lightning import pl  # noqa: E402
from lightning_compress.events import KINDS, history  # noqa: E402
from lightning_compress.export import save_compressed  # noqa: E402
from lightning_compress.recipes import validate_recipe_file  # noqa: E402

CONFIGS = ("dense", "composed", "composed_nostab")
RECIPE = "recipes/fashion_mnist_prune_qat_stabilized.yaml"
FULL_STEPS_PER_EPOCH = 430  # ceil(55,000 / 128): the recipe's epochs in optimizer steps
#: init_args that count optimizer steps: scaled with the run's length (unchanged at the recipe's own length).
STEP_ARGS = ("start_step", "end_step", "update_every", "freeze_observers_step", "freeze_bn_step", "rewind_step",
             "calibration_steps", "warmup_steps", "rewarm_steps", "event_steps")  # fmt: skip
STABILIZERS = ("GradientClipping", "LearningRateWarmup")
MAX_DROP_POINTS, MAX_SIZE_RATIO = 1.0, 1 / 15
BENCHMARK = Benchmark(
    "composed_cnn",
    __doc__,
    shared={"configs": "dense,composed", "epochs": 4, "jobs": 1, "threads": 1, "limit_train": None,
            "limit_test": None, "rounds": 8, "iters": 0},
    options={"seeds": ("0", "comma-separated seeds; every configuration trains once per seed"),
             "recipe": (RECIPE, "the compressed configurations' recipe (relative to the project root, or absolute)")},
    smoke={"configs": ",".join(CONFIGS), "seeds": "0,1", "epochs": 1, "limit_train": 1024, "limit_test": 256,
           "rounds": 2, "iters": 2},
    choices={"configs": CONFIGS},
)  # fmt: skip
DEFAULT_ITERS = 10  # forwards per variant per round (~0.1 s each)


# ------------------------------------------------------------------------------------------------------- the recipe
def scaled(init_args: dict[str, Any], scale: float) -> dict[str, Any]:
    """``init_args`` with every step count times ``scale`` (at least 1 step where it was positive)."""
    out = dict(init_args)
    if scale == 1.0:
        return out
    for key in STEP_ARGS:
        if isinstance(out.get(key), int) and out[key] > 0:
            out[key] = max(1, round(out[key] * scale))
    if isinstance(out.get("end_step"), int) and out["end_step"] <= out.get("start_step", 0):
        out["end_step"] = out.get("start_step", 0) + 1
    return out


def recipe_callbacks(recipe: Path, total: int, stabilized: bool, folder: Path) -> tuple[list[pl.Callback], dict]:
    """The recipe's compression callbacks (and stabilisers when ``stabilized``), their step arguments scaled to a
    run of ``total`` steps, built by ``load_recipe`` from a copy written into ``folder``; and what was built."""
    config = validate_recipe_file(recipe)
    scale = total / (config["trainer"]["max_epochs"] * FULL_STEPS_PER_EPOCH)
    entries = []
    for entry in config["trainer"]["callbacks"]:
        name = entry["class_path"].rsplit(".", 1)[-1]
        if name == "ModelCheckpoint" or (not stabilized and name in STABILIZERS):
            continue
        entries.append({"class_path": entry["class_path"], "init_args": scaled(entry.get("init_args") or {}, scale)})
    copy = folder / f"recipe_{'stabilized' if stabilized else 'plain'}_{total}.yaml"
    copy.write_text(yaml.safe_dump({"trainer": {"callbacks": entries}}, sort_keys=False))
    shown = recipe.relative_to(ROOT).as_posix() if recipe.is_relative_to(ROOT) else recipe.name
    return load_recipe(copy), {"recipe": shown, "scale": scale, "callbacks": entries}


class StabilizerTally(pl.Callback):
    """Counts the steps the stabilisers acted on, from what they log each step.

    Lightning refreshes ``trainer.callback_metrics`` with a step's logged values after its ``on_train_batch_end``
    hooks and only every ``log_every_n_steps``: the fits run with ``log_every_n_steps=1``, and each step's values are
    read at the start of the next one (the last step's at the end of training).
    """

    def __init__(self) -> None:
        self.steps = self.clipped = self.lr_reduced = 0
        self.lr_factor_sum = 0.0

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if trainer.global_step > 0:
            self._read(trainer.callback_metrics)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._read(trainer.callback_metrics)

    def _read(self, metrics: dict[str, Any]) -> None:
        self.steps += 1
        self.clipped += int(float(metrics.get("stabilize/clipped", 0.0)) > 0)
        factor = float(metrics.get("stabilize/lr_factor", 1.0))
        self.lr_factor_sum += factor
        self.lr_reduced += int(factor < 1.0)

    def summary(self) -> dict[str, Any]:
        return {"steps": self.steps, "steps_clipped": self.clipped, "steps_lr_below_1": self.lr_reduced,
                "mean_lr_factor": self.lr_factor_sum / max(1, self.steps)}  # fmt: skip


# ------------------------------------------------------------------------------------------------------- one fit
def run_config(config: str, seed: int, args: dict[str, Any], folder: str) -> dict[str, Any]:
    quiet_process(args["threads"])
    work = Path(folder)
    data, steps_per_epoch = fashion_mnist(seed, args["limit_train"])
    total = args["epochs"] * steps_per_epoch
    model = reference_cnn(seed)
    result: dict[str, Any] = {"config": config, "seed": seed, "steps": total, "steps_per_epoch": steps_per_epoch}
    callbacks: list[pl.Callback] = []
    tally = StabilizerTally()
    if config != "dense":
        recipe = Path(args["recipe"]) if Path(args["recipe"]).is_absolute() else ROOT / args["recipe"]
        callbacks, result["schedule"] = recipe_callbacks(recipe, total, config == "composed", work)
        callbacks.append(tally)
    fit_s, timer = fit(f"{config} seed {seed}", model, data, callbacks, every=steps_per_epoch,
                       max_epochs=args["epochs"], log_every_n_steps=1)  # fmt: skip
    result.update(fit_s=fit_s, step_ms=timer.summary(min(20, total // 5)))
    loader = data.test_dataloader()
    trained = evaluate(model, loader, args["limit_test"])
    result["test"] = public(trained)
    stem = work / f"{config}_seed{seed}"
    if config == "dense":
        torch.save(model.state_dict(), stem.with_suffix(".pt"))
        result["file"] = {"path": str(stem.with_suffix(".pt")), "bytes": stem.with_suffix(".pt").stat().st_size,
                          "format": "torch.save(model.state_dict()), fp32"}  # fmt: skip
        _report(result)
        return result
    pruning = next(cb for cb in callbacks if isinstance(cb, GradualPruning))
    qat = next(cb for cb in callbacks if isinstance(cb, QuantizationAwareTraining))
    int8 = qat.int8_model
    int8_eval = evaluate(int8, loader, args["limit_test"])
    result["int8_test"] = {**public(int8_eval), "agreement_with_qat": _agreement(int8_eval, trained)}
    path = stem.with_suffix(".lc")
    written = save_compressed(int8, path)
    result["file"] = {"path": str(path), "bytes": path.stat().st_size, "save_compressed_returned": written,
                      "format": "save_compressed(int8 model)"}  # fmt: skip
    reloaded = evaluate(load_compressed(path), loader, args["limit_test"])
    result["reloaded_test"] = {**public(reloaded), "agreement_with_int8": _agreement(reloaded, int8_eval)}
    result["sparsity"] = {"masks": pruning.sparsity(), "masks_per_layer": pruning.layer_sparsity(),
                          "int8_weight_zeros": _int8_zeros(int8)}  # fmt: skip
    log = history(model.trainer)
    result["events"] = {kind: sum(e.kind == kind for e in log) for kind in KINDS}
    result["stabilizers"] = tally.summary()
    _report(result)
    return result


def _agreement(a: dict[str, Any], b: dict[str, Any]) -> float:
    return float((a["pred"] == b["pred"]).float().mean())


def _int8_zeros(model: torch.nn.Module) -> dict[str, Any]:
    layers, zeros, total = {}, 0, 0
    for name, module in model.named_modules():
        q = getattr(module, "qweight", None)
        if isinstance(q, torch.Tensor):
            z = int((q == 0).sum())
            layers[name] = z / q.numel()
            zeros, total = zeros + z, total + q.numel()
    return {"overall": zeros / total if total else 0.0, "layers": layers}


def _report(r: dict[str, Any]) -> None:
    parts = [f"[{r['config']} seed {r['seed']}] test acc {100 * r['test']['acc']:.2f} %"]
    if "int8_test" in r:
        parts.append(f"int8 {100 * r['int8_test']['acc']:.2f} %, sparsity {r['sparsity']['masks']:.4f}")
    parts.append(f"file {r['file']['bytes']:,} B, fit {r['fit_s']:.0f} s")
    print(", ".join(parts), flush=True)


# ------------------------------------------------------------------------------------------------------- latency
def latency(dense: dict[str, Any], composed: dict[str, Any], args: Any) -> dict[str, Any]:
    """fp32 from its file against int8 from its export, interleaved (1 thread, batch 256 of t10k images)."""
    from lightning_compress.data import FashionMNISTDataModule
    from lightning_compress.models import ImageClassifier

    fp32 = ImageClassifier(image_size=28)
    fp32.load_state_dict(torch.load(dense["file"]["path"], weights_only=True))
    variants = {"fp32": fp32.eval(), "int8": load_compressed(composed["file"]["path"])}
    data = FashionMNISTDataModule(batch_size=256)
    data.setup("test")
    batch = torch.stack([data.test_set[i][0] for i in range(256)])
    iters = args.iters or DEFAULT_ITERS
    rounds = interleaved(variants, (batch,), args.rounds, iters, 1, "latency")
    layers = {name: type(module).__name__ for name, module in variants["int8"].net.named_children()}
    return {
        "batch": 256, "threads": torch.get_num_threads(), "rounds": args.rounds, "iters_per_round": iters,
        "int8_layers": layers,
        "fp32": latency_summary(rounds, "fp32", 1), "int8": latency_summary(rounds, "int8", 1),
        "speedup_means": ratio(rounds, "fp32", "int8", statistics.fmean),
        "speedup_medians": ratio(rounds, "fp32", "int8", statistics.median),
        "cpu_speedup_medians": ratio(rounds, "fp32", "int8", statistics.median, "cpu_ms"),
        "rounds_raw": rounds,
    }  # fmt: skip


# ------------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> None:
    run = BENCHMARK.start(argv)
    args = run.args
    seeds = [int(s) for s in args.seeds.split(",") if s]
    configs = run.items("configs")
    folder = tempfile.mkdtemp(prefix="composed_cnn_")
    try:
        tasks = [(c, s, run.settings, folder) for s in seeds for c in configs]
        results = in_processes(run_config, tasks, args.jobs)
        by_key = {(r["config"], r["seed"]): r for r in results}
        for r in results:
            dense = by_key.get(("dense", r["seed"]))
            if dense is not None and r is not dense:
                r["drop_vs_dense_points"] = 100 * (dense["test"]["acc"] - r["int8_test"]["acc"])
                r["file_ratio_vs_dense"] = r["file"]["bytes"] / dense["file"]["bytes"]
                r["acceptance"] = {
                    "drop_within_1_point": r["drop_vs_dense_points"] <= MAX_DROP_POINTS,
                    "file_within_1_15": r["file_ratio_vs_dense"] <= MAX_SIZE_RATIO,
                }
        pair = (by_key.get(("dense", seeds[0])), by_key.get(("composed", seeds[0])))
        timing = latency(*pair, args) if all(pair) else None
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    for r in results:
        r["file"].pop("path")
    wall_s = run.wall_s()
    payload = {"wall_s": wall_s, "results": {f"{r['config']}_seed{r['seed']}": r for r in results}, "latency": timing}
    title = "Pruning 90 % + int8 QAT + stabilisers on the reference CNN: accuracy, export size, int8 latency"
    run.finish(payload, title, _markdown(results, timing, args, wall_s))


def _markdown(results: list[dict[str, Any]], timing: dict[str, Any] | None, args: Any, wall_s: float) -> list[str]:
    rows = []
    for r in results:
        int8, drop = r.get("int8_test"), r.get("drop_vs_dense_points")
        ratio_ = r.get("file_ratio_vs_dense")
        stab = r.get("stabilizers")
        rows.append([
            r["config"], r["seed"], f"{100 * r['test']['acc']:.2f}", f"{100 * int8['acc']:.2f}" if int8 else "-",
            "-" if drop is None else f"{drop:+.2f}",
            f"{r['sparsity']['int8_weight_zeros']['overall']:.4f}" if int8 else "0",
            f"{r['file']['bytes']:,}", "-" if ratio_ is None else f"1/{1 / ratio_:.1f}",
            f"{100 * r['reloaded_test']['acc']:.2f}" if int8 else "-",
            f"{stab['steps_clipped']} / {stab['steps_lr_below_1']}" if r["config"] == "composed" and stab else "-",
            f"{r['fit_s'] / 60:.1f}",
        ])  # fmt: skip
    header = ["configuration", "seed", "trained acc % (fp32 / fake quant)", "int8 acc %", "drop vs dense (points)",
              "weight sparsity", "file bytes", "file vs dense", "reloaded export acc %",
              "steps clipped / lr re-warmed", "fit min"]  # fmt: skip
    limits = (f"{'' if args.limit_test is None else f', test cut to {args.limit_test}'}"
              f"{'' if args.limit_train is None else f', training set cut to {args.limit_train}'}")  # fmt: skip
    lines = [
        f"- {args.epochs} epochs x {results[0]['steps_per_epoch']} steps (batch 128, Adam 1e-3), seeds {args.seeds}, "
        f"recipe `{args.recipe}`{limits}; wall time {wall_s / 60:.1f} min with --jobs {args.jobs}",
        "",
        *table(header, rows),
        "",
        f"Acceptance: int8 accuracy drop <= {MAX_DROP_POINTS} point vs dense, export <= 1/15 of the dense fp32 file "
        "(`torch.save(state_dict)`). A positive drop means lower accuracy than dense.",
    ]
    for r in results:
        if "int8_test" in r:
            layers = ", ".join(
                f"{n.removeprefix('net.')} {v:.3f}" for n, v in r["sparsity"]["int8_weight_zeros"]["layers"].items()
            )
            stab = r["stabilizers"]
            acted = (
                f"; {stab['steps_clipped']} steps clipped, mean lr factor {stab['mean_lr_factor']:.3f}"
                if r["config"] == "composed"
                else ""
            )
            lines.append(
                f"- {r['config']} seed {r['seed']}: int8 weight zeros per layer {layers}; events {r['events']}{acted}"
            )
    lines.append("")
    for r in results:
        if "acceptance" in r:
            met = all(r["acceptance"].values())
            verdict, drop, share = "met" if met else "missed", r["drop_vs_dense_points"], 1 / r["file_ratio_vs_dense"]
            lines.append(f"- {r['config']} seed {r['seed']}: **{verdict}** (drop {drop:+.2f}, file 1/{share:.1f})")
    if timing is not None:
        lines += ["", f"## CPU latency, 1 thread, batch {timing['batch']}, {timing['rounds']} rounds x "
                  f"{timing['iters_per_round']} interleaved forwards", "", *_latency_table(timing), "",
                  "int8 layers: " + ", ".join(f"{n} {t}" for n, t in timing["int8_layers"].items())]  # fmt: skip
    return lines


def _latency_table(timing: dict[str, Any]) -> list[str]:
    header = ["model", "ms, median of round medians [min-max]", "mean ms [min-max]", "speed-up vs fp32 (means)",
              "speed-up (medians)", "speed-up (CPU time)"]  # fmt: skip
    fp32, int8 = timing["fp32"], timing["int8"]
    rows = [
        ["fp32 (torch.save file)", fmt_spread(fp32["median_of_medians_ms"]), fmt_spread(fp32["mean_ms"]), *"---"],
        ["int8 (save_compressed export)", fmt_spread(int8["median_of_medians_ms"]), fmt_spread(int8["mean_ms"]),
         *(fmt_spread(timing[k], 2, "x") for k in ("speedup_means", "speedup_medians", "cpu_speedup_medians"))],
    ]  # fmt: skip
    return table(header, rows)


if __name__ == "__main__":
    main()
