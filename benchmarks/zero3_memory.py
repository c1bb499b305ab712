"""Per-rank memory and time of each compression callback under DeepSpeed ZeRO-3 (2 CPU processes), against the same
fit with no callback.

Committed results (benchmarks/results/zero3_memory.{json,md}) came from:

    .venv/bin/python benchmarks/zero3_memory.py --rounds 0 --memory-rounds 1                # memory, both models
    .venv/bin/python benchmarks/zero3_memory.py --models mlp --memory-rounds 0 --rounds 1 --name zero3_time  # time

ZeRO-3 exists so that no rank holds the whole model; this measures what each callback adds to a rank. Two models:
`mlp`, 8 x Linear(2048, 2048) + ReLU (33.6M parameters, batch 16, MSE on fixed random data, 20 steps), and `gpt2`,
transformers' GPT-2 with 8 layers of width 1024 and a vocabulary of 8192 (109M parameters, batch 2 x 32 tokens of
fixed random text, 10 steps). Adam (torch's), lr 1e-4, fp32, DeepSpeed's ZeRO-3 defaults (parameters under 1e5
elements stay whole on every rank), one torch thread per rank. Configurations:
- `none`: no callback;
- `prune_global`, `prune_layer`: `GradualPruning(0.9)`, global and layer scope, from step 0 to half the fit, a mask
  update every quarter of it (steps 0, 5, 10 of 20);
- `prune_2to4`: `GradualPruning(pattern="2:4", scope="layer")`, the same ramp;
- `lowrank_one_shot`: `LowRankRefactoring(rank_ratio=0.25, start_step=0, end_step=1, schedule="constant")`: cut at
  setup, trains the small factors;
- `lowrank_ramp`: `LowRankRefactoring(rank_ratio=0.25)` on the same ramp as pruning: full-rank factors until fit end;
- `qat`: `QuantizationAwareTraining(8, 8)`.

Each fit runs in fresh processes (benchmarks/_zero3_fit.py). Measured per rank: the peak resident memory of the
training loop (the kernel's high-water mark, reset when training starts) and of the whole process (`ru_maxrss`),
and the training loop's wall time. The model is built in `__init__`, as a fine-tuning script loads a pretrained one,
so each rank holds it whole until DeepSpeed partitions it: the process peak includes that build, which no callback
can change; the training peak is what a callback adds while it trains.

Memory and time come from separate fits. Memory rounds run with glibc's `MALLOC_MMAP_THRESHOLD_=65536`, which makes
every large tensor its own mapping, so freed memory leaves the resident set and the peaks count live memory (without
it, a callback's tensors reuse the heap the partitioned model left, and go unseen); that setting also makes
memory-bound tensor operations several times slower here (no huge pages for those mappings), so timed rounds run
with glibc's defaults. Added memory and the time ratio are taken against `none` of the same round (each round runs
every configuration once, in an order rotated per round); "share" is the rank's fp32 share of the parameters
(4 bytes x parameters / 2), the unit the acceptance reads in: pruning may add 0.3 share plus one layer (the largest
parameter, fp32, whole).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from _common import MACHINE_NOTE, ROOT, Benchmark, fmt_spread, spread, table
from _timing import rotated
from _zero3_fit import CONFIGS

MODELS = ("mlp", "gpt2")
STEPS = {"mlp": 20, "gpt2": 10}
BATCH = {"mlp": 16, "gpt2": 2}
PRUNING = ("prune_global", "prune_layer", "prune_2to4")
BENCHMARK = Benchmark(
    "zero3_memory",
    __doc__,
    shared={"models": ",".join(MODELS), "configs": ",".join(CONFIGS), "rounds": 1, "seed": 0},
    options={
        "memory_rounds": (1, "rounds of memory fits (--rounds: rounds of timed fits)"),
        "mlp_width": (2048, "width of the MLP's 8 layers"),
        "steps_scale": (1.0, "scale every model's steps"),
    },
    smoke={
        "models": "mlp",
        "configs": "none,prune_global,lowrank_one_shot",
        "rounds": 1,
        "memory_rounds": 1,
        "mlp_width": 256,
        "steps_scale": 0.4,
    },
    choices={"models": MODELS, "configs": CONFIGS},
)


def run_fit(model: str, config: str, args: Any, memory: bool) -> list[dict[str, Any]]:
    """One 2-process ZeRO-3 fit in fresh processes (``memory``: large tensors as their own mappings); each rank's
    record."""
    with tempfile.TemporaryDirectory(prefix="zero3_memory_") as folder:
        steps = max(4, round(STEPS[model] * args.steps_scale))
        spec = {"model": model, "config": config, "steps": steps, "batch": BATCH[model], "seed": args.seed,
                "width": args.mlp_width, "out_dir": folder}  # fmt: skip
        spec_path = Path(folder, "spec.json")
        spec_path.write_text(json.dumps(spec))
        env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "HF_HUB_OFFLINE": "1"}
        env["TORCH_EXTENSIONS_DIR"] = str(ROOT / ".cache" / "torch_extensions")
        env.pop("MALLOC_MMAP_THRESHOLD_", None)
        if memory:
            env["MALLOC_MMAP_THRESHOLD_"] = "65536"
        for var in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "SLURM_JOB_ID", "SLURM_NTASKS"):
            env.pop(var, None)
        script = Path(__file__).resolve().parent / "_zero3_fit.py"
        proc = subprocess.run([sys.executable, str(script), str(spec_path)], env=env, cwd=folder, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=1800)  # fmt: skip
        if proc.returncode != 0:
            raise RuntimeError(f"{model}/{config} failed ({proc.returncode}):\n{proc.stdout[-3000:]}")
        return [json.loads(Path(folder, f"rank{rank}.json").read_text()) for rank in range(2)]


def summarise(memory: list[dict[str, Any]], timed: list[dict[str, Any]], config: str) -> dict[str, Any]:
    """Added memory (memory rounds) and time ratio (timed rounds) against ``none`` of the same round, over rounds x
    ranks; a kind with no rounds gives ``None``."""
    added_train, added_process, shares, ratios, steps = [], [], [], [], []
    for fits in memory:
        for mine, base in zip(fits[config], fits["none"], strict=True):
            share_mb = 4 * base["param_share"] / 2**20
            added_train.append((mine["peak_train_kb"] - base["peak_train_kb"]) / 1024)
            added_process.append((mine["peak_process_kb"] - base["peak_process_kb"]) / 1024)
            shares.append(added_train[-1] / share_mb)
    for fits in timed:
        ratios.append(fits[config][0]["train_s"] / fits["none"][0]["train_s"])
        steps.append(1000 * statistics.median(fits[config][0]["step_s"][1:]))
    any_fit = (memory or timed)[0]
    base = any_fit["none"][0]
    return {
        "added_train_peak_mb": spread(added_train) if added_train else None,
        "added_train_peak_shares": spread(shares) if shares else None,
        "added_process_peak_mb": spread(added_process) if added_process else None,
        "train_time_ratio": spread(ratios) if ratios else None,
        "median_step_ms": spread(steps) if steps else None,
        "params_trained": any_fit[config][0]["params_trained"],
        "rank_share_mb": 4 * base["param_share"] / 2**20,
        "one_layer_mb": 4 * base["largest_param"] / 2**20,
    }


def acceptance(model: str, rows: dict[str, dict[str, Any]]) -> list[str]:
    """The issue's acceptance lines, for what was measured (memory, time or both)."""
    lines = []
    for config in [c for c in PRUNING if c in rows]:
        row = rows[config]
        if row["added_train_peak_mb"] is not None:
            allowed = 0.3 * row["rank_share_mb"] + row["one_layer_mb"]
            worst = row["added_train_peak_mb"]["max"]
            verdict = "PASS" if worst <= allowed else "FAIL"
            lines.append(f"- {model} {config}: adds at most {worst:.0f} MB (allowed {allowed:.0f} MB = 0.3 share + one"
                         f" layer): {verdict}")  # fmt: skip
        if row["train_time_ratio"] is not None:
            worst = row["train_time_ratio"]["max"]
            lines.append(f"- {model} {config}: train time at most {worst:.2f}x of none (allowed 1.10x):"
                         f" {'PASS' if worst <= 1.10 else 'FAIL'}")  # fmt: skip
    row = rows.get("lowrank_one_shot")
    if row is not None:
        for key, what, below in (("added_train_peak_mb", "memory", 0.0), ("train_time_ratio", "time", 1.0)):
            if row[key] is not None:
                worst = row[key]["max"]
                lines.append(f"- {model} lowrank_one_shot below dense in {what} (at most {worst:+.2f}):"
                             f" {'PASS' if worst < below else 'FAIL'}")  # fmt: skip
    return lines


def cell(spread_or_none: dict[str, float] | None, digits: int, suffix: str = "") -> str:
    return "not measured" if spread_or_none is None else fmt_spread(spread_or_none, digits, suffix)


def main(argv: list[str] | None = None) -> None:
    run = BENCHMARK.start(argv)
    configs = run.items("configs")
    if "none" not in configs:
        run.error("--configs must include none: every figure is against it")
    if run.args.rounds + run.args.memory_rounds < 1:
        run.error("--rounds and --memory-rounds are both 0: nothing to measure")
    results: dict[str, Any] = {}
    note = "Per rank, against `none` of the same round; spreads over rounds x ranks."
    lines = ["", f"Machine: {MACHINE_NOTE}. {note}", ""]
    for model in run.items("models"):
        rounds: dict[str, list[dict[str, Any]]] = {"memory": [], "timed": []}
        for kind, count in (("memory", run.args.memory_rounds), ("timed", run.args.rounds)):
            for index in range(count):
                order = rotated(configs, index)
                rounds[kind].append({config: run_fit(model, config, run.args, kind == "memory") for config in order})
                print(f"{model} {kind} round {index + 1}/{count} done", flush=True)
        rows = {config: summarise(rounds["memory"], rounds["timed"], config) for config in configs}
        results[model] = {"summary": rows, "rounds": rounds}
        base = rows["none"]
        lines += [f"## {model}: rank share {base['rank_share_mb']:.0f} MB, one layer {base['one_layer_mb']:.0f} MB", ""]
        lines += table(
            ["configuration", "added training peak, MB", "in rank shares", "added process peak, MB",
             "train time vs none", "median step, ms", "parameters trained"],
            [[config, cell(row["added_train_peak_mb"], 0), cell(row["added_train_peak_shares"], 2),
              cell(row["added_process_peak_mb"], 0), cell(row["train_time_ratio"], 2, "x"),
              cell(row["median_step_ms"], 0), f"{row['params_trained']:,}"]
             for config, row in rows.items()],
        )  # fmt: skip
        lines += ["", *acceptance(model, rows), ""]
    run.finish({"results": results}, "ZeRO-3, 2 CPU processes: what each callback adds per rank", lines, threads=1)


if __name__ == "__main__":
    main()
