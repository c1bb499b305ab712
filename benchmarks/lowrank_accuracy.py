"""Low-rank refactoring of MiniLM's encoder: Linear parameters kept, test accuracy after fine-tuning, CPU latency.

Committed results came from (benchmarks/results/lowrank_accuracy.{json,md}, the 150-step recipe of qat_accuracy.py):

    .venv/bin/python benchmarks/lowrank_accuracy.py --steps 150 --seed 0 --jobs 2 \
        --configs minilm_fp32,lowrank_budget48,lowrank_ratio32,lowrank_budget48_ramp

and, with twice the steps for both the dense and the low-rank fine-tune (benchmarks/results/lowrank_accuracy_300.*):

    .venv/bin/python benchmarks/lowrank_accuracy.py --steps 300 --seed 0 --jobs 2 --rounds 6 \
        --configs minilm_fp32,lowrank_budget48 --name lowrank_accuracy_300

(both before `calibration_steps` existed, and before ranks_for_budget shared the budget out in equal shares), then
activation-aware (benchmarks/results/lowrank_accuracy_cal_300.* and lowrank_accuracy_cal.*):

    .venv/bin/python benchmarks/lowrank_accuracy.py --steps 300 --seed 0 --jobs 2 --rounds 6 \
        --configs minilm_fp32,lowrank_ratio32_cal_oneshot,lowrank_budget48_cal_oneshot --name lowrank_accuracy_cal_300
    .venv/bin/python benchmarks/lowrank_accuracy.py --steps 150 --seed 0 --jobs 2 --no-latency \
        --configs minilm_fp32,lowrank_ratio32_cal,lowrank_ratio32_cal_oneshot --name lowrank_accuracy_cal

Every process runs `torch.set_num_threads(1)`. The recipe is qat_accuracy.py's MiniLM fine-tune: Rotten Tomatoes
(`RottenTomatoesDataModule`: 9,808 train / 1,000 val / 2,000 test snippets, max_length 64, batch 32),
`MiniLMClassifier` (all-MiniLM-L6-v2 + mean pooling + Linear head, AdamW 2e-5, weight decay 0.01, every module in
train mode), `--steps` optimizer steps, seed 0. Each configuration is a fit of its own, seeded the same way (same
initial weights, data order and dropout masks), in a process of its own (`--jobs` runs that many at once; it changes
wall time only). Accuracy is this script's own loop (eval mode, argmax) over the 2,000 test snippets.

Configurations (`LOWRANK` below holds the exact arguments):
- `minilm_fp32`: dense fine-tune, no callback.
- `lowrank_*`: `LowRankRefactoring(..., include=[r"encoder\\.encoder\\.layer\\..*"])`, i.e. the 36 Linear layers of
  the 6 encoder blocks (query, key, value, attention output, intermediate, output; the pooler and the head stay
  dense). At setup each becomes its full-rank SVD factorisation of the *pretrained* weights (FACTS.md: refactor
  trained weights, not a random initialisation), the effective rank falls on the cubic schedule from `start_step` to
  `end_step` (every `update_every` steps), fine-tuning goes on at the target ranks for the remaining steps, and at fit
  end the callback truncates every layer to its active components. The target:
  - `lowrank_budget48`: `param_budget=0.48`: the 36 layers together keep at most 48 % of their dense weights, ranks
    allocated across layers by `ranks_for_budget` (0.48 rather than 0.5 so that the reduction stays >= 50 % with the
    biases, which the factorisation keeps, counted in; the committed weight-only runs used its earlier greedy
    allocation by energy per weight, today's gives every layer the same share of its spectrum);
  - `lowrank_ratio32`: `rank_ratio=0.32`: every layer keeps ceil(0.32 * 384) = 123 of its 384 directions (uniform;
    48 % of the weights);
  - `lowrank_energy72`: `energy=0.72`: each layer keeps the fewest directions holding 72 % of its squared singular
    values (46.5 % of the weights on the pretrained encoder; not in the committed results);
  - schedules are fractions of `--steps`: start 0, end 0.6, a rank update every 10 steps (at 150 steps the ranks fall
    during the first 90 steps, then 60 steps at the target); `_ramp`: end 0.33, every 5 steps (50 steps of ramp,
    100 at the target);
  - `_cal`: activation-aware, `calibration_steps=16`: the layers gather their inputs' second moment over steps
    1-16, at step 16 (`start_step`) the factors are rebased on the whitened SVD, then the cubic ramp to 0.6 of the
    steps; `_cal_oneshot`: the same rebase, then `schedule="constant"`: every layer at its target rank at once at
    step 16 (the schedule's end_step and update_every are then unused; the results table still lists them).

What is reported per configuration, counted from the trained model after fit (so from the truncated layers): the
encoder Linear parameters (weights and biases of the 36 layers; weights alone too) dense vs now, the reduction, every
layer's rank (summary min/median/max, and the median per layer kind), test accuracy and the drop vs `minilm_fp32`,
fit time and step time (`on_train_batch_start` -> `on_train_batch_end`; runs in parallel processes on a shared
machine, so only indicative).

Latency (a final step in the main process, after every fit, when the machine is quieter): the whole MiniLMClassifier
forward (eval mode, `torch.inference_mode`, 1 torch thread) on the first 16 test snippets (16 x 64 tokens, padded as
in training), for the fine-tuned dense model and each fine-tuned truncated model (the very models that were tested,
saved by the fit processes into a temporary folder). Interleaved rounds as in int8_speed.py: every round gives the
variants turns strictly in order (one untimed warm-up call each, then `--iters` turns of one timed call each), the
order rotated each round, so load bursts on the shared machine hit every variant within a fraction of a second.
Headline: the speed-up dense / low-rank as the ratio of the round's mean latencies, median [min-max] over
`--rounds` rounds; the ratio of per-round medians and of thread CPU time (`time.thread_time`, which does not count
time other jobs held the core) are kept too. An output check first: every variant's logits against the dense
model's are reported (they differ: the models were fine-tuned separately), and the truncated model's forward runs
through `LowRankLinear` with all components active (no rank mask multiply left).
"""

from __future__ import annotations

import re
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Benchmark, in_processes, quiet_process, spread, table  # noqa: E402
from _models import ENCODER_LINEAR_KINDS  # noqa: E402
from _timing import interleaved, per_round, ratio  # noqa: E402
from _training import detached_copy, evaluate, fit, minilm, public, rotten_tomatoes  # noqa: E402

from lightning_compress._lightning import pl  # noqa: E402
from lightning_compress.lowrank import LowRankLinear, LowRankRefactoring  # noqa: E402

ENCODER_LINEARS = r"encoder\.encoder\.layer\..*"
CALIBRATED = {"calibration_steps": 16}
ONE_SHOT = {"schedule": "constant", "end": 0.6, "update_every": 10}  # end/update_every unused by a constant schedule
#: Low-rank configurations: LowRankRefactoring's target and its schedule (start/end as fractions of --steps).
LOWRANK: dict[str, dict[str, Any]] = {
    "lowrank_budget48": {"target": {"param_budget": 0.48}, "start": 0.0, "end": 0.6, "update_every": 10},
    "lowrank_ratio32": {"target": {"rank_ratio": 0.32}, "start": 0.0, "end": 0.6, "update_every": 10},
    "lowrank_budget48_late": {"target": {"param_budget": 0.48}, "start": 0.2, "end": 0.8, "update_every": 10},
    "lowrank_budget48_ramp": {"target": {"param_budget": 0.48}, "start": 0.0, "end": 0.33, "update_every": 5},
    "lowrank_ratio32_ramp": {"target": {"rank_ratio": 0.32}, "start": 0.0, "end": 0.33, "update_every": 5},
    "lowrank_energy72": {"target": {"energy": 0.72}, "start": 0.0, "end": 0.6, "update_every": 10},
    "lowrank_energy72_ramp": {"target": {"energy": 0.72}, "start": 0.0, "end": 0.33, "update_every": 5},
    # Activation-aware (calibration_steps): input statistics over the first 16 steps, rebase at step 16, then the
    # cubic ramp to 0.6 of the steps (`_cal`) or every layer at its target rank at once (`_cal_oneshot`).
    "lowrank_ratio32_cal": {"target": {"rank_ratio": 0.32}, **CALIBRATED, "end": 0.6, "update_every": 10},
    "lowrank_budget48_cal": {"target": {"param_budget": 0.48}, **CALIBRATED, "end": 0.6, "update_every": 10},
    "lowrank_ratio32_cal_oneshot": {"target": {"rank_ratio": 0.32}, **CALIBRATED, **ONE_SHOT},
    "lowrank_budget48_cal_oneshot": {"target": {"param_budget": 0.48}, **CALIBRATED, **ONE_SHOT},
}
FIT_CONFIGS = ("minilm_fp32", *LOWRANK)
CONFIGS = (*FIT_CONFIGS, "latency")
BENCHMARK = Benchmark(
    "lowrank_accuracy",
    __doc__,
    shared={"configs": "minilm_fp32,lowrank_budget48,lowrank_ratio32", "steps": 150, "seed": 0, "jobs": 1,
            "threads": 1, "limit_test": None, "rounds": 10, "iters": 5},  # --rounds, --iters: of the latency step
    options={"no_latency": (False, "skip the latency step")},
    smoke={"configs": "minilm_fp32,lowrank_ratio32", "steps": 4, "limit_test": 32, "rounds": 1, "iters": 1},
    choices={"configs": CONFIGS},
)  # fmt: skip


def encoder_linears(model: nn.Module) -> dict[str, nn.Module]:
    """The encoder blocks' Linear layers, dense or factorised, by qualified name."""
    pattern = re.compile(ENCODER_LINEARS)
    return {
        name: module
        for name, module in model.named_modules()
        if pattern.fullmatch(name) and isinstance(module, (nn.Linear, LowRankLinear))
    }


def linear_figures(model: nn.Module) -> dict[str, Any]:
    """Parameters (all, and weights alone) of the encoder Linear layers as they are now, and each layer's rank."""
    layers = encoder_linears(model)
    params = sum(p.numel() for m in layers.values() for p in m.parameters())
    biases = sum(m.bias.numel() for m in layers.values() if m.bias is not None)
    ranks, active, dense_shapes = {}, {}, {}
    for name, m in layers.items():
        if isinstance(m, LowRankLinear):
            ranks[name], active[name] = m.rank, m.active_rank
            dense_shapes[name] = (m.out_features, m.in_features)
        else:
            dense_shapes[name] = tuple(m.weight.shape)
    return {
        "layers": len(layers),
        "factorised": len(ranks),
        "params": params,
        "weights": params - biases,
        "ranks": ranks,
        "active_ranks_equal_held": all(active[n] == ranks[n] for n in ranks),
        "dense_shapes": {n: list(s) for n, s in dense_shapes.items()},
    }


def rank_summary(ranks: dict[str, int]) -> dict[str, Any]:
    values = list(ranks.values())
    if not values:
        return {}
    by_kind = {}
    for kind in ENCODER_LINEAR_KINDS:
        kind_values = [r for n, r in ranks.items() if re.fullmatch(r".*layer\.\d+\." + re.escape(kind), n)]
        if kind_values:
            by_kind[kind] = {"min": min(kind_values), "median": statistics.median(kind_values),
                             "max": max(kind_values)}  # fmt: skip
    return {"min": min(values), "median": statistics.median(values), "max": max(values), "by_kind": by_kind}


def lowrank_callback(config: str, total: int) -> tuple[LowRankRefactoring, dict[str, Any]]:
    spec = LOWRANK[config]
    calibration = spec.get("calibration_steps", 0)
    start = max(calibration, round(spec.get("start", 0.0) * total))
    end = max(start + 1, round(spec["end"] * total))
    schedule = {**spec["target"], "start_step": start, "end_step": end, "update_every": spec["update_every"],
                "schedule": spec.get("schedule", "cubic"), "include": [ENCODER_LINEARS]}  # fmt: skip
    if calibration:
        schedule["calibration_steps"] = calibration
    return LowRankRefactoring(**schedule), schedule


def run_fit(config: str, args: dict[str, Any]) -> dict[str, Any]:
    """One fine-tune in this process: fit, count, test, and save the trained model for the latency step."""
    quiet_process(args["threads"])
    data = rotten_tomatoes(args["seed"])
    total = args["steps"]
    model = minilm(args["seed"])
    dense = linear_figures(model)
    result: dict[str, Any] = {"config": config, "steps": total}
    callbacks: list[pl.Callback] = []
    if config in LOWRANK:
        callback, result["schedule"] = lowrank_callback(config, total)
        callbacks.append(callback)
    pl.seed_everything(args["seed"], verbose=False)  # same dropout masks in every configuration
    result["fit_s"], timer = fit(config, model, data, callbacks, every=25, max_steps=total)
    result["step_ms"] = timer.summary(skip=min(10, total // 5))
    now = linear_figures(model)
    result["encoder_linear"] = {
        "layers": dense["layers"],
        "factorised": now["factorised"],
        "params_dense": dense["params"],
        "params_now": now["params"],
        "reduction": 1 - now["params"] / dense["params"],
        "weights_dense": dense["weights"],
        "weights_now": now["weights"],
        "weight_reduction": 1 - now["weights"] / dense["weights"],
        "truncated": now["active_ranks_equal_held"],
    }
    if config in LOWRANK:
        result["ranks"] = now["ranks"]
        result["rank_summary"] = rank_summary(now["ranks"])
        result["target_ranks_match"] = now["ranks"] == callback.target_ranks
    result["test"] = public(evaluate(model, data.test_dataloader(), args["limit_test"]))
    torch.save(detached_copy(model).eval(), Path(args["save_dir"]) / f"{config}.pt")
    _report(result)
    return result


def _report(r: dict[str, Any]) -> None:
    e = r["encoder_linear"]
    parts = [
        f"[{r['config']}] test acc {100 * r['test']['acc']:.2f} %",
        f"encoder Linear params {e['params_dense']:,} -> {e['params_now']:,} ({100 * e['reduction']:.1f} % fewer)",
        f"fit {r['fit_s'] / 60:.1f} min",
    ]
    if "rank_summary" in r:
        s = r["rank_summary"]
        parts.append(f"ranks {s['min']}/{s['median']}/{s['max']}")
    print(", ".join(parts), flush=True)


# ---------------------------------------------------------------------------------------------------- latency
def latency_batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    from lightning_compress.data import RottenTomatoesDataModule

    data = RottenTomatoesDataModule(batch_size=32, seed=seed)
    data.setup("test")
    return data.test_set.input_ids[:16].clone(), data.test_set.attention_mask[:16].clone()


def run_latency(configs: list[str], args: dict[str, Any]) -> dict[str, Any]:
    """Dense vs each truncated model, whole forward, interleaved rounds (see the header)."""
    quiet_process(1)
    save_dir = Path(args["save_dir"])
    variants: dict[str, nn.Module] = {}
    source = {}
    for config in ["minilm_fp32", *[c for c in configs if c in LOWRANK]]:
        path = save_dir / f"{config}.pt"
        if path.exists():
            variants[config] = torch.load(path, weights_only=False).eval()
            source[config] = "fine-tuned in this run"
    if "minilm_fp32" not in variants:  # latency does not depend on the weights' values
        variants = {"minilm_fp32": minilm(args["seed"]).eval(), **variants}
        source["minilm_fp32"] = "pretrained encoder, untrained head (not fine-tuned in this run)"
    if len(variants) < 2:
        raise SystemExit("latency needs at least one low-rank configuration in --configs")
    inputs = latency_batch(args["seed"])
    check = {}
    with torch.inference_mode():
        ref = variants["minilm_fp32"](*inputs)
        for name, model in variants.items():
            out = model(*inputs)
            low = encoder_linears(model)
            check[name] = {
                "logits_rel_l2_vs_dense": float((out - ref).norm() / ref.norm()),
                "argmax_agreement_vs_dense": float((out.argmax(-1) == ref.argmax(-1)).float().mean()),
                "lowrank_layers": sum(isinstance(m, LowRankLinear) for m in low.values()),
                "mask_multiply_skipped": all(
                    m.active_rank == m.rank for m in low.values() if isinstance(m, LowRankLinear)
                ),
                "encoder_linear_params": sum(p.numel() for m in low.values() for p in m.parameters()),
                "total_params": sum(p.numel() for p in model.parameters()),
            }
    rounds = interleaved(variants, inputs, args["rounds"], args["iters"], 1, "latency")
    mean, median = statistics.fmean, statistics.median
    summary = {
        n: {
            "mean_ms": spread(per_round(rounds, n, mean)),
            "median_ms": spread(per_round(rounds, n, median)),
            "speedup_ratio_of_means": ratio(rounds, "minilm_fp32", n, mean),
            "speedup_ratio_of_medians": ratio(rounds, "minilm_fp32", n, median),
            "speedup_cpu_time": ratio(rounds, "minilm_fp32", n, mean, "cpu_ms"),
        }
        for n in variants
    }
    return {
        "config": "latency",
        "inputs": "first 16 test snippets, 16 x 64 tokens (padded as in training)",
        "real_token_share": float(inputs[1].float().mean()),
        "rounds": args["rounds"],
        "iters_per_round": args["iters"],
        "models": source,
        "check": check,
        "summary": summary,
        "rounds_raw": rounds,
    }


# ---------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> None:
    run = BENCHMARK.start(argv)
    args, configs = run.args, run.items("configs")
    fits = [c for c in FIT_CONFIGS if c in configs]
    with tempfile.TemporaryDirectory(prefix="lowrank_accuracy_") as save_dir:
        settings = {**run.settings, "save_dir": save_dir}
        results = in_processes(run_fit, [(c, settings) for c in fits], args.jobs)
        fit_wall_s = run.wall_s()
        latency = None
        if not args.no_latency and (any(c in LOWRANK for c in fits) or "latency" in configs):
            latency = run_latency(configs, settings)
    base = next((r for r in results if r["config"] == "minilm_fp32"), None)
    for r in results:
        if base is not None and r is not base:
            r["test"]["drop_vs_fp32_points"] = 100 * (base["test"]["acc"] - r["test"]["acc"])
    payload = {"fit_wall_s": fit_wall_s, "wall_s": run.wall_s(), "results": {r["config"]: r for r in results},
               "latency": latency}  # fmt: skip
    title = "Low-rank refactoring of MiniLM's encoder: parameters, accuracy after fine-tuning, CPU latency"
    run.finish(payload, title, _markdown(results, latency, args, fit_wall_s))


def _markdown(results: list[dict[str, Any]], latency: dict[str, Any] | None, args: Any, fit_wall_s: float) -> list[str]:
    tested = "2,000" if args.limit_test is None else f"the first {args.limit_test} of 2,000"
    lines = [
        f"- Rotten Tomatoes, MiniLMClassifier, {args.steps} steps, batch 32, AdamW 2e-5, seed {args.seed}, {tested}"
        f" held-out snippets; fine-tunes: {fit_wall_s / 60:.1f} min wall with --jobs {args.jobs}",
        "- encoder Linear = the 36 Linear layers of the 6 encoder blocks (`encoder\\.encoder\\.layer\\..*`), weights +"
        " biases, counted from the trained model after fit (the low-rank layers truncated at fit end)",
    ]
    if results:
        rows = []
        for r in results:
            e, s, drop, sched = (
                r["encoder_linear"],
                r.get("rank_summary"),
                r["test"].get("drop_vs_fp32_points"),
                r.get("schedule"),
            )
            rows.append([
                r["config"], f"{e['params_dense']:,} -> {e['params_now']:,}", f"{100 * e['reduction']:.1f} %",
                f"{100 * r['test']['acc']:.2f}", "-" if drop is None else f"{drop:.2f}",
                "-" if not s else f"{s['min']} / {s['median']:g} / {s['max']}",
                "-" if not s else " / ".join(f"{s['by_kind'][k]['median']:g}" for k in ENCODER_LINEAR_KINDS),
                f"{r['fit_s'] / 60:.1f}", f"{r['step_ms']['median']:.0f}",
                "-" if not sched else ", ".join(f"{k}={v}" for k, v in sched.items() if k != "include"),
            ])  # fmt: skip
        header = ["configuration", "encoder Linear params dense -> after", "reduction", "test acc %",
                  "drop vs fp32 (points)", "ranks min / median / max", "median rank q / k / v / attn-out / FFN-in / "
                  "FFN-out", "fit min", "step ms median", "schedule"]  # fmt: skip
        weights = "; ".join(
            f"{r['config']} {r['encoder_linear']['weights_dense']:,} -> {r['encoder_linear']['weights_now']:,}"
            f" ({100 * r['encoder_linear']['weight_reduction']:.1f} % fewer)"
            for r in results
            if r["config"] in LOWRANK
        )
        lines += [
            "",
            *table(header, rows),
            "",
            f"Drop = fp32 accuracy minus this configuration's (positive = lower). Weights alone (biases not counted): "
            f"{weights}. Step times come from fits running in parallel processes on a shared machine; a low-rank fit"
            " holds both full-rank factors until fit end (rank masks keep shapes), so its steps are slower than dense.",
        ]
    if latency is not None:
        rows = []
        for name, s in latency["summary"].items():
            c, m, sp = latency["check"][name], s["mean_ms"], s["speedup_ratio_of_means"]
            rows.append([name, f"{c['encoder_linear_params']:,}", f"{c['total_params']:,}",
                         f"{m['median']:.1f} [{m['min']:.1f}-{m['max']:.1f}]",
                         f"**{sp['median']:.2f}x** [{sp['min']:.2f}-{sp['max']:.2f}]",
                         f"{s['speedup_ratio_of_medians']['median']:.2f}x",
                         f"{s['speedup_cpu_time']['median']:.2f}x"])  # fmt: skip
        header = ["model", "encoder Linear params", "all params", "latency ms: per-round mean, median [min-max]",
                  "speed-up vs dense: ratio of per-round means, median [min-max]", "ratio of per-round medians",
                  "CPU-time ratio"]  # fmt: skip
        models = "; ".join(f"{k}: {v}" for k, v in latency["models"].items())
        lines += [
            "",
            f"## CPU latency, whole MiniLMClassifier forward ({latency['inputs']}; 1 thread, inference_mode; "
            f"{latency['rounds']} interleaved rounds x {latency['iters_per_round']} calls)",
            "",
            *table(header, rows),
            "",
            f"{100 * latency['real_token_share']:.0f} % of the timed batch's positions are real tokens (the rest"
            f" padding, computed all the same). Models: {models}. The low-rank models run through `LowRankLinear` (two"
            " thin matmuls, all components active, no mask multiply).",
        ]
    return lines


if __name__ == "__main__":
    main()
