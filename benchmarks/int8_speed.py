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
import gc
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import env_markdown, environment, set_threads, spread, write_results  # noqa: E402

from lightning_compress import QuantizationAwareTraining, convert_to_int8  # noqa: E402
from lightning_compress.quantization import Int8Conv2d, Int8Linear, kernels  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("mlp", "cnn", "minilm")
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


@dataclass
class Bench:
    """One model with its timed batch, calibration batches and training labels."""

    name: str
    description: str
    model: nn.Module
    inputs: tuple[torch.Tensor, ...]
    calibration: list[tuple[torch.Tensor, ...]]
    labels: torch.Tensor
    data: str
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------------- models


def _mlp_bench() -> Bench:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for i in range(4):
        layers.append(nn.Linear(1024, 1024))
        if i < 3:
            layers.append(nn.ReLU())
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(64, 1024, generator=gen),) for _ in range(9)]
    labels = torch.randint(0, 1024, (64,), generator=gen)
    return Bench("mlp", "4 x Linear(1024) + ReLU, batch 64", nn.Sequential(*layers).eval(), batches[0],
                 batches[1:], labels, "random normal inputs")  # fmt: skip


def _cnn_bench() -> Bench:
    from lightning_compress.data import FashionMNISTDataModule
    from lightning_compress.data.errors import MissingDataError
    from lightning_compress.models import ReferenceCNN

    torch.manual_seed(0)
    model = ReferenceCNN().eval()
    batch, n_batches = 256, 5
    try:
        data = FashionMNISTDataModule(batch_size=batch)
        data.setup("test")
        test = data.test_set
        images = torch.stack([test[i][0] for i in range(batch * n_batches)])
        labels = torch.stack([test[i][1] for i in range(batch)])
        source = "Fashion-MNIST t10k images"
    except MissingDataError:
        gen = torch.Generator().manual_seed(1)
        images = torch.randn(batch * n_batches, 1, 28, 28, generator=gen)
        labels = torch.randint(0, 10, (batch,), generator=gen)
        source = "random images (Fashion-MNIST not installed)"
    chunks = [(c,) for c in images.split(batch)]
    return Bench("cnn", "ReferenceCNN, batch 256 x 1x28x28", model, chunks[0], chunks[1:], labels, source)


def _minilm_bench() -> Bench:
    from lightning_compress.data.errors import MissingDataError
    from lightning_compress.models import MiniLMClassifier, minilm_path

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = MiniLMClassifier().eval()
    batch, tokens, n_batches = 16, 64, 5
    try:
        from transformers import AutoTokenizer

        from lightning_compress.data.rotten_tomatoes import corpus_path, read_corpus

        texts, all_labels = read_corpus(corpus_path())
        tokenizer = AutoTokenizer.from_pretrained(str(minilm_path()), local_files_only=True)
        enc = tokenizer(texts[: batch * n_batches], padding="max_length", truncation=True, max_length=tokens,
                        return_tensors="pt")  # fmt: skip
        ids, mask = enc["input_ids"], enc["attention_mask"]
        labels = torch.from_numpy(all_labels[:batch])
        source = f"Rotten Tomatoes snippets (first {batch * n_batches}), padded/truncated to {tokens} tokens"
    except MissingDataError:
        gen = torch.Generator().manual_seed(1)
        ids = torch.randint(1000, 30000, (batch * n_batches, tokens), generator=gen)
        mask = torch.ones_like(ids)
        labels = torch.randint(0, 2, (batch,), generator=gen)
        source = "random token ids (Rotten Tomatoes corpus not installed)"
    chunks = list(zip(ids.split(batch), mask.split(batch), strict=True))
    real_tokens = float(chunks[0][1].float().mean())
    bench = Bench("minilm", f"MiniLMClassifier (whole model), {batch} x {tokens} tokens", model, chunks[0],
                  chunks[1:], labels, source)  # fmt: skip
    bench.notes.append(f"{real_tokens:.0%} of the timed batch's positions are real tokens (the rest padding)")
    return bench


BUILDERS: dict[str, Callable[[], Bench]] = {"mlp": _mlp_bench, "cnn": _cnn_bench, "minilm": _minilm_bench}


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


def torchao_int8(model: nn.Module) -> nn.Module:
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    out = copy.deepcopy(model)
    quantize_(out, Int8DynamicActivationInt8WeightConfig())
    return out.eval()


def torchao_qat(model: nn.Module) -> nn.Module:
    from torchao.quantization import quantize_
    from torchao.quantization.qat import IntxFakeQuantizeConfig, QATConfig

    config = QATConfig(
        activation_config=IntxFakeQuantizeConfig(torch.int8, "per_token", is_symmetric=False),
        weight_config=IntxFakeQuantizeConfig(torch.int8, "per_channel", is_symmetric=True),
        step="prepare",
    )
    quantize_(model, config)
    return model


def kernel_use(int8_model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> dict[str, Any]:
    """Which int8 layers ran oneDNN's integer kernel in one forward (calls counted per layer)."""
    calls = [0]
    names = ("linear_u8s8", "conv2d_u8s8")
    originals = {n: getattr(kernels, n) for n in names}

    def counting(fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            calls[0] += 1
            return fn(*args, **kwargs)

        return wrapped

    per_layer: dict[str, int] = {}
    hooks = []
    for name, module in int8_model.named_modules():
        if isinstance(module, (Int8Linear, Int8Conv2d)):
            hooks.append(module.register_forward_pre_hook(lambda m, i, n=name: per_layer.__setitem__(n, -calls[0])))
            hooks.append(
                module.register_forward_hook(lambda m, i, o, n=name: per_layer.__setitem__(n, per_layer[n] + calls[0]))
            )
    try:
        for n in names:
            setattr(kernels, n, counting(originals[n]))
        with torch.inference_mode():
            int8_model(*inputs)
    finally:
        for n in names:
            setattr(kernels, n, originals[n])
        for h in hooks:
            h.remove()
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
    modules = dict(qmodel.named_modules())
    hooks = [modules[n].register_forward_hook(lambda m, i, o, n=n: captured.__setitem__(n, (i[0], o))) for n in names]
    try:
        with torch.inference_mode():
            qmodel(*inputs)
    finally:
        for h in hooks:
            h.remove()
    int8_modules = dict(int8_model.named_modules())
    worst, worst_name = 0.0, ""
    with torch.inference_mode():
        for n, (x, y) in captured.items():
            rel = float((int8_modules[n](x) - y).abs().max() / y.abs().max().clamp(min=1e-12))
            if rel >= worst:
                worst, worst_name = rel, n
    return {"layers_checked": len(captured), "worst_rel_max_abs_diff": worst, "worst_layer": worst_name}


def agreement(ref: torch.Tensor, other: torch.Tensor) -> dict[str, float]:
    ref, other = ref.float(), other.float()
    return {
        "max_abs_diff": float((ref - other).abs().max()),
        "ref_max_abs": float(ref.abs().max()),
        "rel_l2": float((ref - other).norm() / ref.norm().clamp(min=1e-12)),
        "argmax_agreement": float((ref.argmax(-1) == other.argmax(-1)).float().mean()),
    }


# -------------------------------------------------------------------------------------------------------- timing


def time_inference_round(
    variants: dict[str, nn.Module], inputs: tuple[torch.Tensor, ...], order: list[str], iters: int, block: int
) -> dict[str, dict[str, list[float]]]:
    """``iters`` turns of every variant in ``order``, each turn ``block`` calls in a row; wall and thread CPU ms.

    With ``block`` > 1 the first call of each turn (caches still holding the previous variant) is kept apart as
    ``cold_wall_ms`` and the others form ``wall_ms`` / ``cpu_ms``; with ``block`` == 1 every call is in ``wall_ms``.
    """
    out = {name: {"wall_ms": [], "cpu_ms": [], "cold_wall_ms": []} for name in order}
    gc.collect()
    with torch.inference_mode():
        for name in order:  # warm-up
            variants[name](*inputs)
        for _ in range(iters):
            for name in order:
                for i in range(block):
                    c0 = time.thread_time()
                    t0 = time.perf_counter()
                    variants[name](*inputs)
                    wall = time.perf_counter() - t0
                    cpu = time.thread_time() - c0
                    if i == 0 and block > 1:
                        out[name]["cold_wall_ms"].append(round(1e3 * wall, 4))
                        continue
                    out[name]["wall_ms"].append(round(1e3 * wall, 4))
                    out[name]["cpu_ms"].append(round(1e3 * cpu, 4))
    return out


def layer_share(model: nn.Module, inputs: tuple[torch.Tensor, ...], iters: int) -> dict[str, float]:
    """Share of forward time spent inside Linear/Conv layers (float, int8 or torchao), timed with forward hooks."""
    inside = [0.0]
    starts: dict[int, float] = {}
    hooks = []
    for module in model.modules():
        if isinstance(module, TIMED_LAYERS):
            hooks.append(module.register_forward_pre_hook(lambda m, i: starts.__setitem__(id(m), time.perf_counter())))
            hooks.append(
                module.register_forward_hook(
                    lambda m, i, o: inside.__setitem__(0, inside[0] + time.perf_counter() - starts[id(m)])
                )
            )
    shares, totals = [], []
    try:
        with torch.inference_mode():
            model(*inputs)
            for _ in range(iters):
                inside[0] = 0.0
                t0 = time.perf_counter()
                model(*inputs)
                totals.append(time.perf_counter() - t0)
                shares.append(inside[0] / totals[-1])
    finally:
        for h in hooks:
            h.remove()
    return {"layers": len(hooks) // 2, "share_in_layers": statistics.median(shares),
            "forward_ms": 1e3 * statistics.median(totals)}  # fmt: skip


def run_inference(bench: Bench, threads: list[int], args: argparse.Namespace) -> dict[str, Any]:
    qmodel, layers = calibrated_qat(bench)
    int8 = convert_to_int8(qmodel)
    variants: dict[str, nn.Module] = {"fp32": bench.model, "int8": int8}
    result: dict[str, Any] = {"description": bench.description, "data": bench.data, "notes": bench.notes}
    if bench.name in ("mlp", "minilm") and not args.no_torchao:
        try:
            variants["torchao"] = torchao_int8(bench.model)
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
    result["block"] = block
    result["iters_per_round"] = iters
    names = list(variants)
    by_threads = {}
    for t in threads:
        torch.set_num_threads(t)
        rounds = []
        for r in range(args.rounds):
            order = names[r % len(names) :] + names[: r % len(names)]
            rounds.append(time_inference_round(variants, bench.inputs, order, iters, block))
            med = {n: statistics.median(rounds[-1][n]["wall_ms"]) for n in names}
            print(f"[{bench.name} {t} thr] round {r} ({order[0]} first): "
                  + ", ".join(f"{n} {med[n]:.2f} ms" for n in names), flush=True)  # fmt: skip
        summary = {}
        for n in names:
            meds = [statistics.median(rd[n]["wall_ms"]) for rd in rounds]
            cpu = [statistics.median(rd[n]["cpu_ms"]) for rd in rounds]
            summary[n] = {
                "median_of_medians_ms": spread(meds),
                "mean_ms": spread([statistics.fmean(rd[n]["wall_ms"]) for rd in rounds]),
                "cpu_median_of_medians_ms": spread(cpu),
            }
            if block > 1:
                summary[n]["cold_median_of_medians_ms"] = spread(
                    [statistics.median(rd[n]["cold_wall_ms"]) for rd in rounds]
                )
            if n != "fp32":
                summary[n]["speedup_vs_fp32"] = spread(
                    [statistics.median(rd["fp32"]["wall_ms"]) / statistics.median(rd[n]["wall_ms"]) for rd in rounds]
                )
                summary[n]["speedup_vs_fp32_means"] = spread(
                    [statistics.fmean(rd["fp32"]["wall_ms"]) / statistics.fmean(rd[n]["wall_ms"]) for rd in rounds]
                )
                summary[n]["cpu_speedup_vs_fp32"] = spread(
                    [statistics.median(rd["fp32"]["cpu_ms"]) / statistics.median(rd[n]["cpu_ms"]) for rd in rounds]
                )
        share = {n: layer_share(m, bench.inputs, args.share_iters) for n, m in variants.items()}
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
        torchao_qat(model)
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
        order = configs[r % len(configs) :] + configs[: r % len(configs)]
        times: dict[str, list[float]] = {c: [] for c in configs}
        gc.collect()
        for _ in range(warmup):
            for c in order:
                _step(models[c], opts[c], bench)
        for _ in range(steps):
            for c in order:
                t0 = time.perf_counter()
                _step(models[c], opts[c], bench)
                times[c].append(round(1e3 * (time.perf_counter() - t0), 3))
        rounds.append(times)
        print(f"[{bench.name} train] round {r} ({order[0]} first): "
              + ", ".join(f"{c} {statistics.median(times[c]):.1f} ms" for c in configs), flush=True)  # fmt: skip
        del models, opts
    summary = {}
    for c in configs:
        summary[c] = {"median_of_medians_ms": spread([statistics.median(rd[c]) for rd in rounds])}
        if c != "fp32":
            summary[c]["ratio_vs_fp32"] = spread(
                [statistics.median(rd[c]) / statistics.median(rd["fp32"]) for rd in rounds]
            )
    return {"description": bench.description, "steps_per_round": steps, "warmup_steps": warmup, "n_rounds": n_rounds,
            "output_rel_l2_vs_fp32": check, "summary": summary, "rounds": rounds}  # fmt: skip


# ---------------------------------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=8, help="interleaved inference rounds per model and thread count")
    parser.add_argument("--iters", type=int, default=0, help="turns per variant per round (0: per-model default)")
    parser.add_argument("--block", type=int, default=0, help="calls in a row per turn (0: per-model default)")
    parser.add_argument("--threads", default="1", help="comma-separated torch thread counts for inference, e.g. 1,2")
    parser.add_argument("--models", default=",".join(MODELS), help="inference models")
    parser.add_argument("--share-iters", type=int, default=7, help="forwards timed with per-layer hooks (median)")
    parser.add_argument("--train-models", default="mlp,minilm", help="training-step models ('' to skip)")
    parser.add_argument("--train-rounds", type=int, default=0, help="training rounds (0: per-model default)")
    parser.add_argument("--train-steps", type=int, default=0, help="timed steps per config per round (0: default)")
    parser.add_argument("--warmup-steps", type=int, default=0, help="untimed steps per config per round (0: default)")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--no-torchao", action="store_true", help="skip the torchao references")
    parser.add_argument("--name", default="int8_speed", help="results file stem under benchmarks/results/")
    args = parser.parse_args()
    threads = [int(t) for t in args.threads.split(",") if t]
    models = [m for m in args.models.split(",") if m]
    train_models = [m for m in args.train_models.split(",") if m]
    if unknown := (set(models) | set(train_models)) - set(MODELS):
        parser.error(f"unknown models {sorted(unknown)}; choose from {MODELS}")
    if not threads or min(threads) < 1:
        parser.error("--threads must list thread counts >= 1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    set_threads(threads[0])
    try:
        script = Path(sys.argv[0]).resolve().relative_to(ROOT).as_posix()
    except ValueError:
        script = "benchmarks/int8_speed.py"
    command = " ".join([".venv/bin/python", script, *sys.argv[1:]])

    benches: dict[str, Bench] = {}
    inference, training = {}, {}
    for name in models:
        benches[name] = benches.get(name) or BUILDERS[name]()
        inference[name] = run_inference(benches[name], threads, args)
    torch.set_num_threads(threads[0])
    for name in train_models:
        benches[name] = benches.get(name) or BUILDERS[name]()
        training[name] = run_training(benches[name], args)

    env = environment(threads[0])
    env["inference_threads"] = threads
    env["torchao"] = _version("torchao")
    env["transformers"] = _version("transformers")
    payload = {"benchmark": "int8_speed", "command": command, "environment": env, "settings": vars(args),
               "inference": inference, "training": training}  # fmt: skip
    md = _markdown(inference, training, env, command, args)
    json_path, md_path = write_results(args.name, payload, md)
    print(md)
    print(f"wrote {json_path.relative_to(ROOT)} and {md_path.relative_to(ROOT)}")


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def _fmt(s: dict[str, float], digits: int = 2, suffix: str = "") -> str:
    return f"{s['median']:.{digits}f}{suffix} [{s['min']:.{digits}f}-{s['max']:.{digits}f}]"


def _markdown(inference: dict[str, Any], training: dict[str, Any], env: dict[str, Any], command: str, args: Any) -> str:
    lines = [
        "# Int8 inference speed and QAT training-step time",
        "",
        env_markdown(env, command).rstrip(),
        f"- inference torch threads: {env['inference_threads']}; torchao {env['torchao']}, transformers "
        f"{env['transformers']}",
        "- see the script's header for what is timed and how the rounds are interleaved.",
    ]
    if inference:
        lines += [
            "",
            f"## Inference latency ({args.rounds} interleaved rounds; median of per-round medians [min-max])",
            "",
            "| model | threads | variant | latency ms | speed-up vs fp32: ratio of per-round means, median [min-max] "
            "| speed-up: ratio of per-round medians | CPU speed-up (thread_time medians) "
            "| share of time in Linear/Conv layers |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for res in inference.values():
            for t, block in res["by_threads"].items():
                for variant, s in block["summary"].items():
                    speed = _fmt(s["speedup_vs_fp32"], 2, "x") if "speedup_vs_fp32" in s else "1 (reference)"
                    means = _fmt(s["speedup_vs_fp32_means"], 2, "x") if "speedup_vs_fp32_means" in s else "1"
                    cpu = _fmt(s["cpu_speedup_vs_fp32"], 2, "x") if "cpu_speedup_vs_fp32" in s else "-"
                    if t != "1":
                        cpu = "- (other threads not counted)" if variant != "fp32" else "-"
                    share = block["layer_share"][variant]["share_in_layers"]
                    bold = "**" if variant == "int8" else ""
                    lines.append(
                        f"| {res['description']} | {t} | {INFER_LABELS[variant]} | {_fmt(s['median_of_medians_ms'])} "
                        f"| {bold}{means}{bold} | {speed} | {cpu} | {share:.0%} |"
                    )
        lines += [
            "",
            "### Checks (one forward of the timed batch)",
            "",
            "| model | data | int8 layers on oneDNN's integer kernel | per layer, int8 vs QAT on the same input: worst "
            "max abs diff / max abs output | whole model, int8 vs QAT eval: max abs diff (max abs) / rel L2 / argmax "
            "agree | fp32 vs QAT eval: rel L2 / argmax agree | torchao vs fp32: rel L2 / argmax agree |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, res in inference.items():
            k, a = res["kernels"], res["agreement"]
            iq, fq = a["int8_vs_qat_eval"], a["fp32_vs_qat_eval"]
            kern = f"{k['layers_on_integer_kernel']}/{k['int8_layers']}"
            if k["float_fallback_layers"]:
                kern += f" (float fallback: {', '.join(k['float_fallback_layers'])})"
            if not k["onednn_available"]:
                kern += " (oneDNN unavailable)"
            ta = a.get("torchao_vs_fp32")
            tao = f"{ta['rel_l2']:.4f} / {ta['argmax_agreement']:.1%}" if ta else res.get("torchao_error", "-")
            pl_ = a["per_layer_int8_vs_qat"]
            lines.append(
                f"| {name} | {res['data']} | {kern} | {pl_['worst_rel_max_abs_diff']:.1e} (`{pl_['worst_layer']}`) "
                f"| {iq['max_abs_diff']:.2e} ({iq['ref_max_abs']:.3g}) / "
                f"{iq['rel_l2']:.2e} / {iq['argmax_agreement']:.1%} | {fq['rel_l2']:.4f} / "
                f"{fq['argmax_agreement']:.1%} | {tao} |"
            )
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
        if notes:
            lines += ["", *(f"- {n}" for n in notes)]
    if training:
        lines += [
            "",
            f"## Training-step time (forward + backward + AdamW; {env['torch_threads']} thread; interleaved rounds, "
            "fresh models each round)",
            "",
            "| model | configuration | step ms: median of per-round medians [min-max] "
            "| ratio vs fp32, per round: median [min-max] | output rel L2 vs fp32 (check) |",
            "|---|---|---|---|---|",
        ]
        for res in training.values():
            for config, s in res["summary"].items():
                ratio = _fmt(s["ratio_vs_fp32"], 3, "x") if "ratio_vs_fp32" in s else "1 (reference)"
                lines.append(
                    f"| {res['description']} ({res['n_rounds']} rounds x {res['steps_per_round']} steps) "
                    f"| {TRAIN_LABELS[config]} "
                    f"| {_fmt(s['median_of_medians_ms'])} | {ratio} | {res['output_rel_l2_vs_fp32'][config]:.4f} |"
                )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
