"""Int8 inference speed of converted models against fp32 (and torchao), and the QAT training-step overhead.

Committed results (benchmarks/results/int8_speed.{json,md}) came from:

    .venv/bin/python benchmarks/int8_speed.py --rounds 8

Part 1, inference latency (``torch.inference_mode``, eval mode, one forward of one batch per call):
- models: ``mlp`` = 4 x Linear(1024, 1024) with ReLU between them, batch 64 (random normal inputs);
  ``cnn`` = ``ReferenceCNN`` (conv32-pool-conv64-pool-fc128-fc10), batch 256 of real Fashion-MNIST t10k images
  (random images when the data set is not installed); ``minilm`` = the whole ``MiniLMClassifier`` (all-MiniLM-L6-v2
  encoder, mean pooling, linear head), 16 Rotten Tomatoes snippets tokenised to 64 tokens (random token ids when the
  corpus is not installed). Weights: the float initialisation (pretrained for the MiniLM encoder); speed does not
  depend on training.
- variants: ``fp32`` (the float model); ``int8`` = ours: ``QuantizationAwareTraining(weight_bits=8,
  activation_bits=8).prepare`` on a copy, calibrated with a few forwards of held-out batches (only the QAT layers in
  training mode, so their observers update and dropout stays off), ``enable_fake_quant()``, then
  ``convert_to_int8`` (oneDNN u8s8 kernels, static per-tensor input scales); ``torchao`` = torchao's
  ``quantize_(copy, Int8DynamicActivationInt8WeightConfig())`` (Linear layers only, int8 weights per channel,
  dynamic per-token int8 activations) for the mlp and minilm, as a reference.
- checks, so that no wrong model is timed: the int8 model's outputs against the QAT model's eval outputs (which it
  must reproduce up to float rounding; max abs diff, relative L2 error, argmax agreement), fp32 against the QAT model
  (the quantization error itself), torchao against fp32; and which int8 layers actually ran oneDNN's integer kernel
  (``kernels.linear_u8s8`` / ``conv2d_u8s8`` calls counted per layer during one forward; a layer with no call fell
  back to the float path).
- interleaving: every round gives the variants turns strictly in order (a b c a b c ...; one untimed warm-up call
  each per round), the order rotated each round, so a burst of load from the shared machine hits all variants within
  a fraction of a second. Each turn is ``--block`` calls in a row, each timed alone with ``perf_counter`` (mlp: 5,
  others: 1): the first call of a turn runs with caches full of the previous variant's weights (the fp32 mlp streams
  16 MB, the L2 is 2 MB per core), which cost the int8 mlp ~25 % in a first version that alternated single calls
  (2.6-2.8 ms against 2.2 ms back to back); so for the mlp the first call of each turn is reported apart ("cold") and
  the other 4 are the figures below. The cnn and minilm calls are 10-100x longer, so reloading weights is noise.
  Reported: per variant the median of the per-round median latencies [min-max], and the speed-up fp32 / variant
  computed within each round, median [min-max] over rounds, taken two ways: the ratio of the round's mean latencies
  (the headline) and of its median latencies. On a loaded machine the medians favour the shorter call: the scheduler
  preempts this process every few ms, so most short (int8) calls run uninterrupted while most long (fp32) calls
  include a wait, and the ratio of medians overstates the speed-up (3.4x against 2.4x for the mlp in one run at load
  ~5); the interleaved means share the waits in proportion to the work. The CPU time of the calling thread
  (``time.thread_time``) is kept too: at 1 torch thread all the work runs on that thread and CPU time does not count
  the time other jobs held the core; its ratio agrees with the ratio of means.
- where the time goes: after the rounds, forward hooks time each Linear/Conv layer (float, int8, or torchao) for a few
  extra forwards; the share = time inside those layers / whole forward time (hook overhead included), median
  over those forwards.
- ``--threads 1,2`` repeats Part 1 at each torch thread count. On this 2-core machine shared with other jobs, 2
  threads were unusable: whenever the other core is busy, every parallel region waits for its descheduled second
  thread (4-round trial at load ~5.7: mlp fp32 23-176 ms per call, int8 8-436 ms), so only 1 thread is committed.

Part 2, training-step time (1 torch thread, the first of ``--threads``): one step = zero_grad, forward, cross entropy
(random labels for the mlp, the snippets' labels for minilm), backward, AdamW step, in a plain loop (no Trainer, so the
layers' cost is measured alone; the callback's own per-step hook work is a few flag checks). Configurations, each a
fresh copy of the same float model per round:
- ``fp32``: the float model;
- ``ours_observe``: our QAT layers (w8 per channel + a8 per tensor) before ``start_step``: observers update, the
  fake-quantization arithmetic is skipped (a host-side copy of the flag);
- ``ours``: our QAT layers after ``start_step``: fake quantization of weights and inputs enabled, observers updating;
- ``torchao``: torchao 0.18 ``QATConfig(activation_config=IntxFakeQuantizeConfig(torch.int8, "per_token",
  is_symmetric=False), weight_config=IntxFakeQuantizeConfig(torch.int8, "per_channel", is_symmetric=True),
  step="prepare")`` via ``quantize_`` (FakeQuantizedLinear: dynamic per-token activation ranges, no observers).
Steps are interleaved step by step (a b c d a b c d ...), order rotated per round, ``--warmup-steps`` untimed steps per
config per round first. Reported: median of per-round median step times and the ratio config / fp32 within each round.
A check first runs one seeded forward of every config in training mode (same dropout masks) and records the relative
L2 difference of its output from fp32 (0 for ``ours_observe``; > 0 proves the fake quantization is on).
"""

from __future__ import annotations

import argparse
import copy
import functools
import statistics
import sys
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any
from unittest import mock

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _torchao  # noqa: E402
from _common import Benchmark, fmt_spread, package_version, quiet_process, spread, table  # noqa: E402
from _models import BUILDERS, MODELS, Bench, agreement, forward_hooks  # noqa: E402
from _timing import interleaved, interleaved_steps, latency_summary, ratio, rotated, time_inside  # noqa: E402

from lightning_compress import QuantizationAwareTraining, convert_to_int8  # noqa: E402
from lightning_compress.quantization import Int8Conv2d, Int8Linear, kernels  # noqa: E402

BENCHMARK = Benchmark(
    "int8_speed",
    __doc__,
    shared={"models": ",".join(MODELS), "rounds": 8, "iters": 0, "share_iters": 7},
    options={
        "block": (0, "calls in a row per turn (0: per-model default)"),
        "threads": ("1", "comma-separated torch thread counts for inference, e.g. 1,2"),
        "train_models": ("mlp,minilm", "training-step models ('' to skip)"),
        "train_rounds": (0, "training rounds (0: per-model default)"),
        "train_steps": (0, "timed steps per config per round (0: default)"),
        "warmup_steps": (0, "untimed steps per config per round (0: default)"),
        "lr": (1e-4, "AdamW learning rate of the training steps"),
        "no_torchao": (False, "skip the torchao references"),
    },
    smoke={"rounds": 1, "iters": 1, "share_iters": 1, "train_rounds": 1, "train_steps": 1, "warmup_steps": 1},
    choices={"models": MODELS, "train_models": MODELS},
)
TRAIN_CONFIGS = ("fp32", "ours_observe", "ours", "torchao")
TRAIN_LABELS = {
    "fp32": "fp32",
    "ours_observe": "ours, QAT observing (before start_step)",
    "ours": "ours, QAT fake quant w8a8",
    "torchao": "torchao QAT w8 per-channel + a8 per-token",
}
INFER_LABELS = {"fp32": "fp32", "int8": "ours: convert_to_int8", "torchao": "torchao Int8DynamicActivationInt8Weight"}
DEFAULT_ITERS = {"mlp": 10, "cnn": 12, "minilm": 4}
DEFAULT_BLOCK = {"mlp": 5, "cnn": 1, "minilm": 1}
DEFAULT_TRAIN_STEPS = {"mlp": 15, "cnn": 6, "minilm": 2}
DEFAULT_TRAIN_ROUNDS = {"mlp": 6, "cnn": 4, "minilm": 3}
DEFAULT_WARMUP_STEPS = {"mlp": 3, "cnn": 2, "minilm": 1}
TIMED_LAYERS = (nn.Linear, nn.Conv2d, Int8Linear, Int8Conv2d)


# ---------------------------------------------------------------------------------------------------- conversions


def calibrated_qat(bench: Bench) -> tuple[nn.Module, dict[str, nn.Module]]:
    """A QAT copy (w8 a8) whose observers saw the calibration batches, with fake quantization on, in eval mode."""
    qmodel = copy.deepcopy(bench.model)
    layers = QuantizationAwareTraining(weight_bits=8, activation_bits=8).prepare(qmodel)
    qmodel.eval()
    for layer in layers.values():  # observers update in training mode only; keep dropout etc. in eval mode
        layer.train()
    with torch.no_grad():
        for batch in bench.calibration:
            qmodel(*batch)
    for layer in layers.values():
        layer.enable_fake_quant()
    return qmodel.eval(), layers


def kernel_use(int8_model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> dict[str, Any]:
    """Which int8 layers ran oneDNN's integer kernel in one forward (kernel calls counted per layer)."""
    calls = [0]
    per_layer: dict[str, int] = {}

    def counting(kernel: Callable[..., Any]) -> Callable[..., Any]:
        def counted(*args: Any, **kwargs: Any) -> Any:
            calls[0] += 1
            return kernel(*args, **kwargs)

        return counted

    layers = {n: m for n, m in int8_model.named_modules() if isinstance(m, (Int8Linear, Int8Conv2d))}
    with ExitStack() as stack:
        for kernel in ("linear_u8s8", "conv2d_u8s8"):
            stack.enter_context(mock.patch.object(kernels, kernel, counting(getattr(kernels, kernel))))
        before = lambda n: per_layer.__setitem__(n, -calls[0])  # noqa: E731
        stack.enter_context(
            forward_hooks(layers, before, lambda n, i, o: per_layer.__setitem__(n, per_layer[n] + calls[0]))
        )
        stack.enter_context(torch.inference_mode())
        int8_model(*inputs)
    fallback = sorted(n for n, c in per_layer.items() if c == 0)
    return {
        "onednn_available": kernels.onednn_available(torch.device("cpu")),
        "int8_layers": len(per_layer),
        "layers_on_integer_kernel": len(per_layer) - len(fallback),
        "float_fallback_layers": fallback,
    }


def per_layer_check(qmodel: nn.Module, int8_model: nn.Module, names: list[str], inputs: tuple) -> dict[str, Any]:
    """Each int8 layer fed the very input its QAT layer saw: the worst max abs diff relative to the output's max."""
    captured: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    qat_layers, int8_layers = dict(qmodel.named_modules()), dict(int8_model.named_modules())
    with forward_hooks({n: qat_layers[n] for n in names}, after=lambda n, i, o: captured.__setitem__(n, (i[0], o))):
        with torch.inference_mode():
            qmodel(*inputs)
    worst, worst_name = 0.0, ""
    with torch.inference_mode():
        for n, (x, y) in captured.items():
            rel = float((int8_layers[n](x) - y).abs().max() / y.abs().max().clamp(min=1e-12))
            if rel >= worst:
                worst, worst_name = rel, n
    return {"layers_checked": len(captured), "worst_rel_max_abs_diff": worst, "worst_layer": worst_name}


def layer_share(variants: dict[str, nn.Module], inputs: tuple[torch.Tensor, ...], iters: int) -> dict[str, Any]:
    """Per variant, the share of forward time spent inside Linear/Conv layers (float, int8 or torchao), hooked."""
    layers = {v: {n: m for n, m in m_.named_modules() if isinstance(m, TIMED_LAYERS)} for v, m_ in variants.items()}
    timed = time_inside(variants, layers, inputs, iters)
    return {
        v: {"layers": len(layers[v]), "forward_ms": statistics.median(t["forward"]),
            "share_in_layers": statistics.median(i / f for i, f in zip(t["inside"], t["forward"], strict=True))}
        for v, t in timed.items()
    }  # fmt: skip


def run_inference(bench: Bench, threads: list[int], args: argparse.Namespace) -> dict[str, Any]:
    qmodel, layers = calibrated_qat(bench)
    int8 = convert_to_int8(qmodel)
    variants: dict[str, nn.Module] = {"fp32": bench.model, "int8": int8}
    result: dict[str, Any] = {"description": bench.description, "data": bench.data, "notes": bench.notes}
    if bench.name in ("mlp", "minilm") and not args.no_torchao:
        try:
            variants["torchao"] = _torchao.int8_inference(bench.model)
        except Exception as err:  # reported, not fatal: torchao's CPU support varies by version
            result["torchao_error"] = f"{type(err).__name__}: {err}"
    result["kernels"] = kernel_use(int8, bench.inputs)
    with torch.inference_mode():
        outs = {name: m(*bench.inputs) for name, m in variants.items()}
        ref = qmodel(*bench.inputs)
    result["agreement"] = {
        "int8_vs_qat_eval": agreement(ref, outs["int8"]),
        "fp32_vs_qat_eval": agreement(outs["fp32"], ref),
        "int8_vs_fp32": agreement(outs["fp32"], outs["int8"]),
    }
    result["agreement"]["per_layer_int8_vs_qat"] = per_layer_check(qmodel, int8, list(layers), bench.inputs)
    if "torchao" in outs:
        result["agreement"]["torchao_vs_fp32"] = agreement(outs["fp32"], outs["torchao"])
    iters = args.iters or DEFAULT_ITERS[bench.name]
    block = args.block or DEFAULT_BLOCK[bench.name]
    result.update(block=block, iters_per_round=iters)
    by_threads = {}
    for t in threads:
        torch.set_num_threads(t)
        rounds = interleaved(variants, bench.inputs, args.rounds, iters, block, f"{bench.name} {t} thr")
        summary = {}
        for n in variants:
            summary[n] = latency_summary(rounds, n, block)
            if n != "fp32":
                summary[n]["speedup_vs_fp32"] = ratio(rounds, "fp32", n, statistics.median)
                summary[n]["speedup_vs_fp32_means"] = ratio(rounds, "fp32", n, statistics.fmean)
                summary[n]["cpu_speedup_vs_fp32"] = ratio(rounds, "fp32", n, statistics.median, "cpu_ms")
        share = layer_share(variants, bench.inputs, args.share_iters)
        by_threads[str(t)] = {"summary": summary, "layer_share": share, "rounds": rounds}
    torch.set_num_threads(threads[0])
    result["by_threads"] = by_threads
    result["qat_layers"] = len(layers)
    return result


# ------------------------------------------------------------------------------------------------------ training


def _train_model(bench: Bench, config: str) -> nn.Module:
    model = copy.deepcopy(bench.model).train()
    if config in ("ours", "ours_observe"):
        layers = QuantizationAwareTraining(weight_bits=8, activation_bits=8).prepare(model)
        for layer in layers.values():
            layer.enable_fake_quant(config == "ours")
    elif config == "torchao":
        _torchao.fake_quant_per_channel(model)
    return model


def _step(model: nn.Module, opt: torch.optim.Optimizer, bench: Bench) -> float:
    opt.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(*bench.inputs), bench.labels)
    loss.backward()
    opt.step()
    return float(loss.detach())


def run_training(bench: Bench, args: argparse.Namespace) -> dict[str, Any]:
    configs = [c for c in TRAIN_CONFIGS if not (c == "torchao" and args.no_torchao)]
    steps = args.train_steps or DEFAULT_TRAIN_STEPS[bench.name]
    n_rounds = args.train_rounds or DEFAULT_TRAIN_ROUNDS[bench.name]
    warmup = args.warmup_steps or DEFAULT_WARMUP_STEPS[bench.name]
    rounds: list[dict[str, list[float]]] = []
    check: dict[str, float] = {}
    for r in range(n_rounds):
        models = {c: _train_model(bench, c) for c in configs}
        if r == 0:  # one seeded forward each (same dropout masks): is the fake quantization really on?
            outs = {}
            for c, m in models.items():
                torch.manual_seed(123)
                with torch.no_grad():
                    outs[c] = m(*bench.inputs)
            check = {c: agreement(outs["fp32"], o)["rel_l2"] for c, o in outs.items()}
        opts = {c: torch.optim.AdamW(m.parameters(), lr=args.lr) for c, m in models.items()}
        order = rotated(configs, r)
        times = interleaved_steps(lambda c, m=models, o=opts: _step(m[c], o[c], bench), order, steps, warmup)
        rounds.append(times)
        print(f"[{bench.name} train] round {r} ({order[0]} first): "
              + ", ".join(f"{c} {statistics.median(times[c]):.1f} ms" for c in configs), flush=True)  # fmt: skip
        del models, opts
    summary = {c: {"median_of_medians_ms": spread([statistics.median(rd[c]) for rd in rounds])} for c in configs}
    for c in configs[1:]:  # all but fp32
        medians = [(statistics.median(rd[c]), statistics.median(rd["fp32"])) for rd in rounds]
        summary[c]["ratio_vs_fp32"] = spread([mine / fp32 for mine, fp32 in medians])
    return {"description": bench.description, "steps_per_round": steps, "warmup_steps": warmup, "n_rounds": n_rounds,
            "output_rel_l2_vs_fp32": check, "summary": summary, "rounds": rounds}  # fmt: skip


# ---------------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    run = BENCHMARK.start(argv)
    args = run.args
    threads = [int(t) for t in args.threads.split(",") if t]
    models, train_models = run.items("models"), run.items("train_models")
    if not threads or min(threads) < 1:
        run.error("--threads must list thread counts >= 1")
    quiet_process(threads[0])
    bench = functools.cache(lambda name: BUILDERS[name]())  # a model timed in both parts is built once
    inference = {name: run_inference(bench(name), threads, args) for name in models}
    torch.set_num_threads(threads[0])
    training = {name: run_training(bench(name), args) for name in train_models}
    versions = {"torchao": package_version("torchao"), "transformers": package_version("transformers")}
    lines = [
        f"- inference torch threads: {threads}; torchao {versions['torchao']}, transformers {versions['transformers']}",
        "- see the script's header for what is timed and how the rounds are interleaved.",
        *(_inference_tables(inference, args) if inference else []),
        *(_training_table(training, threads[0]) if training else []),
    ]
    title = "Int8 inference speed and QAT training-step time"
    run.finish({"inference": inference, "training": training}, title, lines, threads[0], inference_threads=threads,
               **versions)  # fmt: skip


def _inference_tables(inference: dict[str, Any], args: argparse.Namespace) -> list[str]:
    header = ["model", "threads", "variant", "latency ms",
              "speed-up vs fp32: ratio of per-round means, median [min-max]", "speed-up: ratio of per-round medians",
              "CPU speed-up (thread_time medians)", "share of time in Linear/Conv layers"]  # fmt: skip
    rows = []
    for res in inference.values():
        for t, block in res["by_threads"].items():
            for variant, s in block["summary"].items():
                speed = fmt_spread(s["speedup_vs_fp32"], 2, "x") if "speedup_vs_fp32" in s else "1 (reference)"
                means = fmt_spread(s["speedup_vs_fp32_means"], 2, "x") if "speedup_vs_fp32_means" in s else "1"
                cpu = fmt_spread(s["cpu_speedup_vs_fp32"], 2, "x") if "cpu_speedup_vs_fp32" in s else "-"
                if t != "1":
                    cpu = "- (other threads not counted)" if variant != "fp32" else "-"
                bold = "**" if variant == "int8" else ""
                share = block["layer_share"][variant]["share_in_layers"]
                rows.append([res["description"], t, INFER_LABELS[variant], fmt_spread(s["median_of_medians_ms"]),
                             f"{bold}{means}{bold}", speed, cpu, f"{share:.0%}"])  # fmt: skip
    checks = []
    for name, res in inference.items():
        k, a = res["kernels"], res["agreement"]
        iq, fq, pl_ = a["int8_vs_qat_eval"], a["fp32_vs_qat_eval"], a["per_layer_int8_vs_qat"]
        kern = f"{k['layers_on_integer_kernel']}/{k['int8_layers']}"
        if k["float_fallback_layers"]:
            kern += f" (float fallback: {', '.join(k['float_fallback_layers'])})"
        if not k["onednn_available"]:
            kern += " (oneDNN unavailable)"
        ta = a.get("torchao_vs_fp32")
        checks.append([
            name, res["data"], kern, f"{pl_['worst_rel_max_abs_diff']:.1e} (`{pl_['worst_layer']}`)",
            f"{iq['max_abs_diff']:.2e} ({iq['ref_max_abs']:.3g}) / {iq['rel_l2']:.2e} / {iq['argmax_agreement']:.1%}",
            f"{fq['rel_l2']:.4f} / {fq['argmax_agreement']:.1%}",
            f"{ta['rel_l2']:.4f} / {ta['argmax_agreement']:.1%}" if ta else res.get("torchao_error", "-"),
        ])  # fmt: skip
    notes = [f"{name}: {n}" for name, res in inference.items() for n in res["notes"]]
    for name, res in inference.items():
        for t, block in res["by_threads"].items():
            cold = {v: s["cold_median_of_medians_ms"]["median"] for v, s in block["summary"].items()
                    if "cold_median_of_medians_ms" in s}  # fmt: skip
            if cold:
                notes.append(
                    f"{name} ({t} thread): first call of each turn of {res['block']} (caches holding the previous "
                    "variant), median ms: " + ", ".join(f"{v} {ms:.2f}" for v, ms in cold.items())
                )
    checks_header = ["model", "data", "int8 layers on oneDNN's integer kernel",
                     "per layer, int8 vs QAT on the same input: worst max abs diff / max abs output",
                     "whole model, int8 vs QAT eval: max abs diff (max abs) / rel L2 / argmax agree",
                     "fp32 vs QAT eval: rel L2 / argmax agree", "torchao vs fp32: rel L2 / argmax agree"]  # fmt: skip
    return [
        "",
        f"## Inference latency ({args.rounds} interleaved rounds; median of per-round medians [min-max])",
        "",
        *table(header, rows),
        "",
        "### Checks (one forward of the timed batch)",
        "",
        *table(checks_header, checks),
        *(["", *(f"- {n}" for n in notes)] if notes else []),
    ]


def _training_table(training: dict[str, Any], threads: int) -> list[str]:
    rows = []
    for res in training.values():
        for config, s in res["summary"].items():
            ratio_text = fmt_spread(s["ratio_vs_fp32"], 3, "x") if "ratio_vs_fp32" in s else "1 (reference)"
            rows.append([f"{res['description']} ({res['n_rounds']} rounds x {res['steps_per_round']} steps)",
                         TRAIN_LABELS[config], fmt_spread(s["median_of_medians_ms"]), ratio_text,
                         f"{res['output_rel_l2_vs_fp32'][config]:.4f}"])  # fmt: skip
    header = ["model", "configuration", "step ms: median of per-round medians [min-max]",
              "ratio vs fp32, per round: median [min-max]", "output rel L2 vs fp32 (check)"]  # fmt: skip
    return [
        "",
        f"## Training-step time (forward + backward + AdamW; {threads} thread; interleaved rounds, fresh models each "
        "round)",
        "",
        *table(header, rows),
    ]


if __name__ == "__main__":
    main()
