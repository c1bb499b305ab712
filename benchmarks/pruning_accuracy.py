"""Fashion-MNIST test accuracy after the same training: dense vs GradualPruning vs Lightning's ModelPruning.

Committed results (benchmarks/results/pruning_accuracy.{json,md}) came from:

    .venv/bin/python benchmarks/pruning_accuracy.py --epochs 4 --seed 0 \
        --configs dense,gradual90,modelpruning90,gradual99,modelpruning99 --jobs 2

Setup = the FACTS.md reference: the reference CNN (conv32-conv64-fc128-fc10, `ImageClassifier(image_size=28)`),
Adam 1e-3, batch 128, real Fashion-MNIST (55k train after the DataModule's 5k validation split; test = the 10k t10k
set), seed 0 (same initial weights and data order for every configuration), no validation during fit,
`torch.set_num_threads(1)` in every process. With --jobs 2 two configurations train at once in separate processes;
each is seeded on its own, so this changes wall time only.

Configurations (all prune the weights of every Conv2d/Linear layer, biases stay dense, one global magnitude ranking):
- `dense`: no callback.
- `gradual90` / `gradual99`: GradualPruning(target, schedule="cubic", pattern="unstructured", scope="global") with
  T = epochs * steps_per_epoch optimizer steps (4 * 430 = 1720 here):
    start_step = 8 % of T (138): magnitudes mean little at initialisation; after ~1/3 epoch the net has learned
        which weights matter, and starting early leaves the most time to adapt;
    end_step = 65 % of T (1118): the target is reached with 35 % of training (~1.4 epochs) left to recover at full
        sparsity, which is what keeps the drop small;
    update_every = 50: ~20 mask updates; each prunes a modest slice and leaves 50 Adam steps to adapt before the
        next (tiny runs clamp it to (end-start)//4 so a smoke test still ramps).
- `modelpruning90` / `modelpruning99`: Lightning's ModelPruning("l1_unstructured", use_global_unstructured=True) over
  the same weights, pruning at train-epoch ends (its default `prune_on_train_epoch_end=True`). Its `amount` is the
  fraction of the *remaining* weights pruned at each call, so a constant 0.9 would compound to 99.99 % by epoch 4;
  instead `amount(epoch)` = 1 - (1 - target) ** (1 / (epochs - 1)) at the end of epochs 0 .. epochs-2 (0.536 for 90 %
  over 3 prunes) and 0 after the last epoch, so the target is reached after epoch epochs-2 and the last epoch
  fine-tunes at full sparsity - the same "recover at the target" allowance GradualPruning gets.
  `use_lottery_ticket_hypothesis=False`: its default True rewinds the surviving weights to their initial values
  after every prune, which throws training away inside a fixed 4-epoch budget. `make_pruning_permanent` (default)
  folds the masks into the weights at the end, so both pruned models are plain modules when tested.

Reported: test accuracy, the drop vs dense in points, the measured fraction of exact zeros in the pruned weights
(overall and per layer), and the fit time.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import QUIET, Benchmark, in_processes, quiet_process, table  # noqa: E402
from _training import fashion_mnist, fit, model_pruning, reference_cnn, weight_sparsity  # noqa: E402

from lightning_compress import GradualPruning  # noqa: E402
from lightning_compress._lightning import pl  # noqa: E402

CONFIGS = ("dense", "gradual90", "modelpruning90", "gradual99", "modelpruning99")
BENCHMARK = Benchmark(
    "pruning_accuracy",
    __doc__,
    shared={"configs": "dense,gradual90,modelpruning90", "epochs": 4, "seed": 0, "jobs": 1, "threads": 1,
            "limit_train": None},
    options={"limit_test_batches": (1.0, "Trainer.limit_test_batches")},
    smoke={"epochs": 2, "limit_train": 256, "limit_test_batches": 2.0},
    choices={"configs": CONFIGS},
)  # fmt: skip


def gradual_schedule(total_steps: int) -> dict[str, int]:
    start, end = round(0.08 * total_steps), round(0.65 * total_steps)
    end = max(end, start + 1)
    return {"start_step": start, "end_step": end, "update_every": max(1, min(50, (end - start) // 4))}


def modelpruning_amount(target: float, epochs: int) -> float:
    """Per-call fraction of the remaining weights so that epochs-1 prunes (or 1 if epochs == 1) reach ``target``."""
    prunes = max(1, epochs - 1)
    return 1.0 - (1.0 - target) ** (1.0 / prunes)


class _Amount:
    """ModelPruning's `amount` callable (picklable): `per_prune` at the end of epochs 0 .. last_prune_epoch, else 0."""

    def __init__(self, per_prune: float, last_prune_epoch: int) -> None:
        self.per_prune, self.last_prune_epoch = per_prune, last_prune_epoch

    def __call__(self, epoch: int) -> float:
        return self.per_prune if epoch <= self.last_prune_epoch else 0.0


def run_config(config: str, args: dict[str, Any]) -> dict[str, Any]:
    quiet_process(args["threads"])
    data, steps_per_epoch = fashion_mnist(args["seed"], args["limit_train"])
    total = args["epochs"] * steps_per_epoch
    model = reference_cnn(args["seed"])
    callbacks: list[pl.Callback] = []
    info: dict[str, Any] = {"steps_per_epoch": steps_per_epoch, "total_steps": total}
    if config.startswith("gradual"):
        target = int(config.removeprefix("gradual")) / 100
        schedule = gradual_schedule(total)
        callbacks.append(GradualPruning(target, schedule="cubic", pattern="unstructured", scope="global", **schedule))
        info["schedule"] = {"target_sparsity": target, "schedule": "cubic", **schedule}
    elif config.startswith("modelpruning"):
        target = int(config.removeprefix("modelpruning")) / 100
        per_prune = modelpruning_amount(target, args["epochs"])
        last = max(0, args["epochs"] - 2)
        callbacks.append(model_pruning(model, _Amount(per_prune, last)))
        info["schedule"] = {
            "target_sparsity": target,
            "amount_per_prune": per_prune,
            "prunes_at_end_of_epochs": list(range(last + 1)),
        }
    fit_s, _ = fit(config, model, data, callbacks, every=steps_per_epoch, max_epochs=args["epochs"])
    sparsity = weight_sparsity(model)
    tester = pl.Trainer(limit_test_batches=args["limit_test_batches"], **QUIET)
    test = tester.test(model, datamodule=data, verbose=False)[0]
    result = {
        "config": config,
        "test_acc": float(test["test/acc"]),
        "test_loss": float(test["test/loss"]),
        "weight_sparsity": sparsity,
        "fit_s": fit_s,
        **info,
    }
    print(f"[{config}] test acc {100 * result['test_acc']:.2f} %, sparsity {sparsity['overall']:.4f}", flush=True)
    return result


def main(argv: list[str] | None = None) -> None:
    run = BENCHMARK.start(argv)
    args = run.args
    results = in_processes(run_config, [(c, run.settings) for c in run.items("configs")], args.jobs)
    wall_s = run.wall_s()
    by_config = {r["config"]: r for r in results}
    if "dense" in by_config:
        for r in results:
            r["drop_vs_dense_points"] = 100 * (by_config["dense"]["test_acc"] - r["test_acc"])
    payload = {"wall_s": wall_s, "results": by_config}
    run.finish(payload, "Pruning: Fashion-MNIST test accuracy (reference CNN)", _markdown(results, args, wall_s))


def _markdown(results: list[dict[str, Any]], args: Any, wall_s: float) -> list[str]:
    layer_names = list(results[0]["weight_sparsity"]["layers"])
    rows = []
    for r in results:
        drop = r.get("drop_vs_dense_points")
        layers = r["weight_sparsity"]["layers"]
        sched = r.get("schedule")
        rows.append([
            r["config"], f"{100 * r['test_acc']:.2f}", "-" if drop is None else f"{drop:+.2f}",
            f"{r['weight_sparsity']['overall']:.4f}", *(f"{layers[n]['sparsity']:.3f}" for n in layer_names),
            f"{r['fit_s'] / 60:.1f}", ", ".join(f"{k}={_fmt(v)}" for k, v in sched.items()) if sched else "-",
        ])  # fmt: skip
    tested = "all 10k test images" if args.limit_test_batches == 1.0 else f"{args.limit_test_batches:g} test batches"
    header = ["configuration", "test acc %", "drop vs dense (points)", "weight sparsity (all pruned layers)",
              *(f"{n} sparsity" for n in layer_names), "fit min", "schedule"]  # fmt: skip
    return [
        f"- {args.epochs} epochs x {results[0]['steps_per_epoch']} steps (batch 128, Adam 1e-3), seed {args.seed}, "
        f"{tested}{'' if args.limit_train is None else f', training set cut to {args.limit_train}'}; "
        f"wall time {wall_s / 60:.1f} min with --jobs {args.jobs}",
        "",
        *table(header, rows),
        "",
        "A positive drop means lower accuracy than dense.",
    ]


def _fmt(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


if __name__ == "__main__":
    main()
