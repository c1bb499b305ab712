"""Int8 quantization-aware training: test accuracy of fp32, QAT (fake quant) and the converted int8 model.

Committed results (benchmarks/results/qat_accuracy.{json,md}) came from:

    .venv/bin/python benchmarks/qat_accuracy.py --epochs 4 --steps 150 --seed 0 --jobs 2 \
        --configs cnn_fp32,cnn_qat,minilm_fp32,minilm_qat,minilm_torchao,minilm_qat_late

Every process runs `torch.set_num_threads(1)`. With --jobs 2 two processes run at once: one trains the MiniLM
configurations of the main comparison one after another (so their step times come from one process and the same
batches), the other each CNN configuration and each accuracy-only variant (`SEPARATE`) in turn. Every configuration
is seeded on its own (same initial weights, data order and dropout masks), so --jobs changes wall time only.
Accuracy is measured by this script's own loop (eval mode, argmax) on the test split, for the trained model (fp32, or
the QAT model with fake quantization in eval mode) and for the int8 model; the share of test examples on which the
int8 model predicts the same class as the trained model is reported as a consistency check of the convert.

1. Fashion-MNIST, reference CNN (`ImageClassifier(image_size=28)`, conv32-conv64-fc128-fc10), the FACTS.md recipe of
   pruning_accuracy.py: 4 epochs x 430 steps (T = 1720), Adam 1e-3, batch 128, seed 0, tested on the 10k t10k images.
   - `cnn_fp32`: no callback.
   - `cnn_qat`: QuantizationAwareTraining(weight_bits=8, activation_bits=8) on all 4 layers (conv1, conv2, fc1, fc2):
     weights symmetric per output channel, inputs asymmetric per tensor (moving-average observer), with
       start_step = 12 % of T (206, ~half an epoch) of observe-only warm-up: at initialisation the activation ranges
         move fast while the loss falls; after ~200 steps they have settled, so fake quantization starts from
         representative ranges and still runs for 88 % of training;
       freeze_observers_step = 75 % of T (1290): the last epoch trains at fixed scales, so the weights adapt to
         exactly the grid the int8 model will use and a late drift of the moving averages cannot move it;
       freeze_bn_step = None: the reference CNN has no BatchNorm.
     The int8 model is `callback.int8_model` (convert_to_int8 at fit end: Int8Conv2d/Int8Linear on oneDNN kernels).
2. Rotten Tomatoes (`RottenTomatoesDataModule`: 9,808 train / 1,000 val / 2,000 test snippets, max_length 64, batch
   32), `MiniLMClassifier` (all-MiniLM-L6-v2 + mean pooling + Linear head, AdamW 2e-5, weight decay 0.01), 150
   optimizer steps (the FACTS.md fine-tune), seed 0; every module in train mode for fit (see `run_minilm`).
   - `minilm_fp32`: fine-tune without a callback. `minilm_ptq_dynamic`: that same fp32 model after dynamic int8
     post-training quantization, `torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)` - a
     deprecated API (torch 2.13 warns), used here only as the baseline.
   - `minilm_qat`: QuantizationAwareTraining(8, 8) on all 38 nn.Linear layers (encoder Q/K/V/attention output/FFN x 6
     layers, the pooler, the head), start_step = 10 % (15 steps): the pretrained weights already have meaningful
     ranges, so the warm-up only seeds the activation ranges; freeze_observers_step = 80 % (120): the last 30 steps
     train at the final scales.
   - `minilm_qat_late`: the same with start_step = 50 % (75): fp32 fine-tuning (observing) for the first half, QAT for
     the second - "QAT as a second phase after the fp32 fine-tune" inside the same step budget (accuracy only; its
     step time is the same computation as `minilm_qat`'s).
3. torchao 0.18 QAT on the same MiniLM (`minilm_torchao`), same steps and seed:
   `quantize_(model, QATConfig(Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int8,
   weight_granularity=PerAxis(0)), step="prepare"))` before fit swaps every nn.Linear (the same 38) for
   FakeQuantizedLinear with IntxFakeQuantizeConfig(int8, PerAxis(0), symmetric) weights and IntxFakeQuantizeConfig(
   int8, "per_token", asymmetric) activations. Both are dynamic (ranges recomputed on every forward, no observers), so
   there is no warm-up or freezing to choose. After fit, `QATConfig(same base, step="convert")` on a copy gives
   nn.Linear layers holding IntxUnpackedToInt8Tensor weights with per-token int8 activation quantization; it runs on
   CPU and is tested like the rest. Note the schemes differ: per-token dynamic activation ranges are finer than our
   static per-tensor ranges (and cost a range computation per token at inference).

Step time, two ways:
- In the runs above, a pair of callbacks, the first and the last in the Trainer's list, take `perf_counter` from
  `on_train_batch_start` to `on_train_batch_end` of every optimizer step (forward, backward, optimizer step and every
  callback's batch hooks); the first 10 (MiniLM) / 20 (CNN) steps are skipped. Ratios vs fp32 are marked "(other
  process)" where the two runs were not in the same process. Even within one process the MiniLM runs are ~12 minutes
  apart, and in the committed run the load of the shared machine fell from ~6 to ~0.5 between fp32 and torchao
  (whose step looks 0.54x of fp32's): these ratios are load drift, not overhead.
- `minilm_steptime` (results/qat_accuracy_steptime.{json,md}) measures the overhead:

      .venv/bin/python benchmarks/qat_accuracy.py --configs minilm_steptime --timing-rounds 40 --seed 0 \
          --name qat_accuracy_steptime

  fp32, our QAT (QuantizationAwareTraining(8, 8).prepare, fake quantization on and observers updating: the state of
  most QAT steps) and torchao's QAT (the prepare above) copies of one MiniLMClassifier, all in train mode, take
  training steps strictly in turn on the same batch per round (order rotated per round; plain loop: forward,
  cross-entropy, backward, AdamW step, zero_grad - the Lightning loop and our callback's two cheap batch hooks are
  left out), first 3 rounds skipped; per-round ratios vs fp32.
"""

from __future__ import annotations

import statistics
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _torchao  # noqa: E402
from _common import Benchmark, in_processes, quiet_process, spread, table_row  # noqa: E402
from _timing import interleaved_steps, rotated  # noqa: E402
from _training import detached_copy, evaluate, fashion_mnist, fit, minilm, public, reference_cnn, rotten_tomatoes  # noqa: E402

from lightning_compress import QuantizationAwareTraining  # noqa: E402
from lightning_compress._lightning import pl  # noqa: E402

CNN_CONFIGS = ("cnn_fp32", "cnn_qat")
MINILM_CONFIGS = ("minilm_fp32", "minilm_qat", "minilm_qat_late", "minilm_torchao")
TIMING_CONFIGS = ("minilm_steptime",)
#: Accuracy-only variants: each trains in a process of its own (no step-time ratio is taken across processes).
SEPARATE = ("minilm_qat_late",)
CONFIGS = CNN_CONFIGS + MINILM_CONFIGS + TIMING_CONFIGS
#: Fractions of the training steps at which our QAT starts fake quantization and freezes its observers.
SCHEDULES = {
    "cnn_qat": (0.12, 0.75),
    "minilm_qat": (0.10, 0.80),
    "minilm_qat_late": (0.50, 0.80),
}
BENCHMARK = Benchmark(
    "qat_accuracy",
    __doc__,
    # --epochs and --limit-train are the CNN's (Fashion-MNIST), --steps MiniLM's (batch 32); --limit-test both
    shared={"configs": ",".join(CONFIGS[:2] + ("minilm_fp32", "minilm_qat", "minilm_torchao")), "epochs": 4,
            "steps": 150, "seed": 0, "jobs": 1, "threads": 1, "limit_train": None, "limit_test": None},
    options={"timing_rounds": (30, "rounds of minilm_steptime (3 steps each)")},
    smoke={"configs": "cnn_fp32,cnn_qat,minilm_fp32,minilm_qat", "epochs": 1, "steps": 4, "limit_train": 512,
           "limit_test": 64, "timing_rounds": 2},
    choices={"configs": CONFIGS},
)  # fmt: skip


def agreement(a: dict[str, Any], b: dict[str, Any]) -> float:
    return float((a["pred"] == b["pred"]).float().mean())


def qat_callback(config: str, total: int) -> tuple[QuantizationAwareTraining, dict[str, Any]]:
    start_frac, freeze_frac = SCHEDULES[config]
    start = round(start_frac * total)
    freeze = max(start, round(freeze_frac * total))
    schedule = {"weight_bits": 8, "activation_bits": 8, "start_step": start, "freeze_observers_step": freeze}
    return QuantizationAwareTraining(**schedule), schedule


def int8_result(int8: nn.Module, loader: Any, trained: dict[str, Any], limit: int | None) -> dict[str, Any]:
    """The int8 model's test accuracy, and on how many examples it predicts what the trained model predicts."""
    evaluation = evaluate(int8, loader, limit)
    return {**public(evaluation), "agreement_with_qat": agreement(evaluation, trained)}


# ----------------------------------------------------------------------------------------------- Fashion-MNIST CNN
def run_cnn(config: str, args: dict[str, Any]) -> list[dict[str, Any]]:
    quiet_process(args["threads"])
    data, steps_per_epoch = fashion_mnist(args["seed"], args["limit_train"])
    total = args["epochs"] * steps_per_epoch
    model = reference_cnn(args["seed"])
    callbacks: list[pl.Callback] = []
    result: dict[str, Any] = {"config": config, "model": "cnn", "steps": total, "steps_per_epoch": steps_per_epoch}
    if config == "cnn_qat":
        qat, result["schedule"] = qat_callback(config, total)
        callbacks.append(qat)
    fit_s, timer = fit(config, model, data, callbacks, every=steps_per_epoch, max_epochs=args["epochs"])
    skip = min(20, total // 5)
    result.update(fit_s=fit_s, step_time={"skipped_first": skip, "ms": timer.summary(skip)})
    loader = data.test_dataloader()
    trained = evaluate(model, loader, args["limit_test"])
    result["test"] = public(trained)
    if config == "cnn_qat":
        result["int8_test"] = int8_result(qat.int8_model, loader, trained, args["limit_test"])
    _report(result)
    return [result]


# ------------------------------------------------------------------------------------- Rotten Tomatoes, MiniLM
def run_minilm(configs: list[str], args: dict[str, Any]) -> list[dict[str, Any]]:
    """All MiniLM configurations in one process, one after another, on the same data order and seed, so their step
    times are comparable (same process, same batches)."""
    quiet_process(args["threads"])
    data = rotten_tomatoes(args["seed"])
    loader = data.test_dataloader()
    total, limit = args["steps"], args["limit_test"]
    results = []
    for config in configs:
        model = minilm(args["seed"])
        callbacks: list[pl.Callback] = []
        result: dict[str, Any] = {"config": config, "model": "minilm", "steps": total}
        if config in SCHEDULES:
            qat, result["schedule"] = qat_callback(config, total)
            callbacks.append(qat)
        elif config == "minilm_torchao":
            _torchao.qat_prepare(model).train()
            result["schedule"] = _torchao.QAT_SCHEDULE
        pl.seed_everything(args["seed"], verbose=False)  # same dropout masks in every configuration
        fit_s, timer = fit(config, model, data, callbacks, every=25, max_steps=total)
        skip = min(10, total // 5)
        result.update(fit_s=fit_s, step_time={"skipped_first": skip, "ms": timer.summary(skip)})
        trained = evaluate(model, loader, limit)
        result["test"] = public(trained)
        if config in SCHEDULES:
            result["int8_test"] = int8_result(qat.int8_model, loader, trained, limit)
        elif config == "minilm_torchao":
            result["int8_test"] = int8_result(_torchao.qat_convert(detached_copy(model)), loader, trained, limit)
        _report(result)
        results.append(result)
        if config == "minilm_fp32":  # the post-training baseline, from this very fp32 model
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                ptq = torch.ao.quantization.quantize_dynamic(detached_copy(model), {nn.Linear}, dtype=torch.qint8)
            evaluation = evaluate(ptq, loader, limit)
            ptq_result = {
                "config": "minilm_ptq_dynamic",
                "model": "minilm",
                "steps": total,
                "schedule": {"from": "minilm_fp32", "api": "torch.ao.quantization.quantize_dynamic (deprecated)"},
                "int8_test": {**public(evaluation), "agreement_with_fp32": agreement(evaluation, trained)},
            }
            _report(ptq_result)
            results.append(ptq_result)
        del model, callbacks
    return results


def run_steptime(args: dict[str, Any]) -> list[dict[str, Any]]:
    """fp32, our QAT and torchao's QAT MiniLM take training steps strictly in turn on the same batches (the order
    rotated every round), so load changes on the shared machine hit all three alike; per-round ratios vs fp32."""
    quiet_process(args["threads"])
    data = rotten_tomatoes(args["seed"])
    fp32 = minilm(args["seed"])
    ours, theirs = detached_copy(fp32), detached_copy(fp32)
    for layer in QuantizationAwareTraining(weight_bits=8, activation_bits=8).prepare(ours).values():
        layer.enable_fake_quant(True)  # the state of most QAT steps: fake quantization on, observers updating
    models = {"fp32": fp32, "ours": ours, "torchao": _torchao.qat_prepare(theirs)}
    optimizers = {name: model.configure_optimizers() for name, model in models.items()}
    names = list(models)
    ms: dict[str, list[float]] = {name: [] for name in names}
    batches = iter(data.train_dataloader())

    def step(name: str, batch: Any) -> None:
        logits, y = models[name].logits_and_targets(batch)
        F.cross_entropy(logits, y).backward()
        optimizers[name].step()
        optimizers[name].zero_grad()

    for round_ in range(args["timing_rounds"]):
        batch = next(batches)
        for name, times in interleaved_steps(lambda n, b=batch: step(n, b), rotated(names, round_), 1).items():
            ms[name] += times
        if round_ % 10 == 9:
            print(f"[minilm_steptime] round {round_ + 1}", flush=True)
    skip = min(3, args["timing_rounds"] // 5)
    result: dict[str, Any] = {"config": "minilm_steptime", "model": "minilm", "rounds": args["timing_rounds"]}
    result["skipped_first_rounds"] = skip
    fp32_ms = ms["fp32"][skip:]
    for name in names:
        kept = ms[name][skip:]
        result[name] = {
            "ms": {**spread(kept), "mean": statistics.fmean(kept)},
            "ratio_per_round": spread([a / b for a, b in zip(kept, fp32_ms, strict=True)]),
            "ratio_of_means": statistics.fmean(kept) / statistics.fmean(fp32_ms),
        }
    summary = ", ".join(f"{n} {result[n]['ms']['median']:.0f} ms ({result[n]['ratio_per_round']['median']:.3f}x)"
                        for n in names)  # fmt: skip
    print(f"[minilm_steptime] {summary}", flush=True)
    return [result]


def _report(r: dict[str, Any]) -> None:
    parts = [f"[{r['config']}]"]
    if "test" in r:
        parts.append(f"test acc {100 * r['test']['acc']:.2f} %")
    if "int8_test" in r:
        parts.append(f"int8 acc {100 * r['int8_test']['acc']:.2f} %")
    if "step_time" in r:
        parts.append(f"step median {r['step_time']['ms']['median']:.1f} ms, fit {r['fit_s']:.0f} s")
    print(", ".join(parts), flush=True)


def run_group(kind: str, configs: list[str], args: dict[str, Any]) -> list[dict[str, Any]]:
    if kind == "steptime":
        results = run_steptime(args)
    else:
        results = run_minilm(configs, args) if kind == "minilm" else run_cnn(configs[0], args)
    for r in results:
        r["process"] = "+".join(configs)
    return results


def main(argv: list[str] | None = None) -> None:
    run = BENCHMARK.start(argv)
    args, configs = run.args, run.items("configs")
    minilm_configs = [c for c in configs if c in MINILM_CONFIGS and c not in SEPARATE]
    groups = ([("minilm", minilm_configs)] if minilm_configs else []) + [
        ("cnn", [c]) for c in configs if c in CNN_CONFIGS
    ]
    groups += [("minilm", [c]) for c in configs if c in SEPARATE]
    groups += [("steptime", [c]) for c in configs if c in TIMING_CONFIGS]
    grouped = in_processes(run_group, [(kind, cs, run.settings) for kind, cs in groups], args.jobs)
    wall_s = run.wall_s()
    results = [r for group in grouped for r in group]
    order = {c: i for i, c in enumerate(CONFIGS[:3] + ("minilm_ptq_dynamic",) + CONFIGS[3:])}
    results.sort(key=lambda r: order[r["config"]])
    _compare(results)
    payload = {"wall_s": wall_s, "results": {r["config"]: r for r in results}}
    title = "Int8 QAT: test accuracy of fp32, QAT (fake quant) and the converted int8 model"
    timing = [r for r in results if r["config"] in TIMING_CONFIGS]
    accuracy = [r for r in results if r["config"] not in TIMING_CONFIGS]
    lines = (_accuracy_table(accuracy, args, wall_s) if accuracy else []) + [
        line for r in timing for line in _timing_table(r)
    ]
    run.finish(payload, title, lines)


def _compare(results: list[dict[str, Any]]) -> None:
    """Points below the same model's fp32 run, and step-time ratios against it."""
    fp32 = {r["model"]: r for r in results if r["config"].endswith("_fp32")}
    for r in results:
        base = fp32.get(r["model"])
        if base is None or r is base:
            continue
        for key in ("test", "int8_test"):
            if key in r:
                r[key]["drop_vs_fp32_points"] = 100 * (base["test"]["acc"] - r[key]["acc"])
        if "step_time" in r:
            mine, theirs = r["step_time"]["ms"], base["step_time"]["ms"]
            r["step_time"]["same_process_as_fp32"] = r["process"] == base["process"]
            r["step_time"]["ratio_of_medians_vs_fp32"] = mine["median"] / theirs["median"]
            r["step_time"]["ratio_of_means_vs_fp32"] = mine["mean"] / theirs["mean"]


def _timing_table(r: dict[str, Any]) -> list[str]:
    lines = [
        "",
        f"## MiniLM step time, interleaved ({r['rounds']} rounds, first {r['skipped_first_rounds']} skipped)",
        "",
        "fp32, our QAT (fake quantization on, observers updating) and torchao's QAT take training steps strictly in"
        " turn on the same batches (batch 32, 64 tokens, AdamW; order rotated per round) in one process; each step is"
        " forward + backward + optimizer step, timed with `perf_counter`.",
        "",
        "| model | step ms median [min-max] | mean ms | ratio vs fp32 per round: median [min-max] | ratio of means |",
        "|---|---|---|---|---|",
    ]
    for name in ("fp32", "ours", "torchao"):
        ms, ratio = r[name]["ms"], r[name]["ratio_per_round"]
        lines.append(
            f"| {name} | {ms['median']:.0f} [{ms['min']:.0f}-{ms['max']:.0f}] | {ms['mean']:.0f} "
            f"| {ratio['median']:.3f}x [{ratio['min']:.3f}-{ratio['max']:.3f}] | {r[name]['ratio_of_means']:.3f}x |"
        )
    return lines


def _accuracy_table(results: list[dict[str, Any]], args: Any, wall_s: float) -> list[str]:
    lines = [
        f"- seed {args.seed}; Fashion-MNIST: reference CNN, {args.epochs} epochs, batch 128, Adam 1e-3, 10k test images"
        f"; Rotten Tomatoes: MiniLMClassifier, {args.steps} steps, batch 32, AdamW 2e-5, 2,000 held-out snippets"
        f"{'' if args.limit_test is None else f' (test cut to {args.limit_test})'}"
        f"{'' if args.limit_train is None else f', Fashion-MNIST training set cut to {args.limit_train}'}"
        f"; wall time {wall_s / 60:.1f} min with --jobs {args.jobs}",
        "- step time: `on_train_batch_start` -> `on_train_batch_end` per optimizer step, first steps skipped; the"
        " MiniLM configurations ran one after another in one process on the same batches, each CNN"
        " configuration in its own process. Runs minutes apart on a shared machine see different load, so these"
        " ratios mix the overhead with load drift; the interleaved `minilm_steptime` measures the overhead",
        "",
        "| configuration | trained model acc % (fp32 / fake-quant eval) | int8 model acc % | int8 vs fp32 (points) "
        "| int8 agrees with trained | step ms median [q1-q3] | step time vs fp32 (medians / means) | fit min "
        "| schedule |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        test, int8, st = r.get("test"), r.get("int8_test"), r.get("step_time")
        agree = None if int8 is None else int8.get("agreement_with_qat", int8.get("agreement_with_fp32"))
        ratio = "-"
        if st is not None and "ratio_of_medians_vs_fp32" in st:
            ratio = f"{st['ratio_of_medians_vs_fp32']:.3f}x / {st['ratio_of_means_vs_fp32']:.3f}x"
            ratio += "" if st["same_process_as_fp32"] else " (other process)"
        elif st is not None:
            ratio = "1"
        sched = r.get("schedule")
        drop = None if int8 is None else int8.get("drop_vs_fp32_points")
        cells = [
            r["config"],
            "-" if test is None else f"{100 * test['acc']:.2f}",
            "-" if int8 is None else f"{100 * int8['acc']:.2f}",
            "-" if drop is None else f"{-drop:+.2f}",
            "-" if agree is None else f"{100 * agree:.2f} %",
            "-" if st is None else f"{st['ms']['median']:.1f} [{st['ms']['q1']:.1f}-{st['ms']['q3']:.1f}]",
            ratio,
            "-" if st is None else f"{r['fit_s'] / 60:.1f}",
            ", ".join(f"{k}={v}" for k, v in sched.items()) if sched else "-",
        ]
        lines.append(table_row(cells))
    lines += [
        "",
        "Int8 vs fp32 is the int8 model's accuracy minus the same model's fp32 run (negative = lower). For the fp32"
        " rows the int8 column is empty; `minilm_ptq_dynamic` is the fp32 MiniLM after dynamic int8 post-training"
        " quantization.",
    ]
    return lines


if __name__ == "__main__":
    main()
