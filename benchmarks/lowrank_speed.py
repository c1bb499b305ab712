"""Inference speed of truncated low-rank models (LowRankRefactoring) against fp32, next to their FLOP ratios.

Committed results (benchmarks/results/lowrank_speed.{json,md}) came from:

    .venv/bin/python benchmarks/lowrank_speed.py --rounds 8

Issue acceptance (low-rank refactoring): "4x Linear(1024) MLP at rank 128: measured speed-up >= 0.75x of the FLOP
ratio (benchmark, one run)".

- models (the inputs and weights of ``int8_speed.py``, both from ``_models.py``): ``mlp`` = 4 x Linear(1024, 1024)
  with ReLU between them, batch 64, every Linear at rank 128 (``rank_ratio=0.125``); ``cnn`` = ``ReferenceCNN``
  (conv32-pool-conv64-pool-fc128-fc10), batch 256 of Fashion-MNIST t10k images (random images when the data set is not
  installed), ``rank_ratio=0.25`` on conv1, conv2 and fc1 (fc2, 10 x 128, stays dense); ``minilm`` = the MiniLM
  encoder of ``MiniLMClassifier`` alone (all-MiniLM-L6-v2, pretrained weights; ``last_hidden_state`` of 16 Rotten
  Tomatoes snippets at 64 tokens, random token ids when the corpus is not installed), ``rank_ratio=0.25`` on the 36
  Linears of its 6 layers (``encoder\\.encoder\\.layer\\..*`` of the wrapper; embeddings and pooler stay dense).
- low-rank model: a copy of the fp32 model, ``LowRankRefactoring(rank_ratio=..., end_step=1, include=...).prepare``
  (full-rank SVD factors), each layer's rank mask set to its target number of most important components (what the
  callback's rank update does at ``end_step``), then the callback's ``truncate(model)``: physically smaller factors,
  each layer two matmuls / convolutions (``kh x kw`` into ``rank`` channels, then 1x1). Speed does not depend on
  training, so the weights are the initial (or pretrained) ones: the low-rank outputs differ from fp32 by the
  truncation error (reported), which fine-tuning would reduce.
- a third variant, ``fp32_same_layout``: the fp32 model with every Linear weight in the memory layout the truncated
  LowRankLinear keeps its factors in (``inference_layout``: shape unchanged, stored as its transpose, row-major),
  so that the speed-up can be read against a dense model given the same advantage.
- checks, so that no wrong model is timed: every targeted layer is a LowRank layer whose rank equals its target and
  its active rank; the truncated model's outputs equal the masked (untruncated) model's up to float rounding; the
  relative L2 difference from fp32 (the truncation error on untrained weights).
- FLOP ratios (theoretical): ``targeted layers`` = the targeted layers' dense FLOPs / their factorised FLOPs (each
  layer's dense FLOPs from ``measure_model``'s per-layer count on the dense model, times the layer's
  ``flops_factor`` = ``rank * (out + in*kh*kw) / (out * in*kh*kw)``); ``whole model`` = ``FlopCounterMode``'s count of
  one forward of the timed batch on the dense model / on the truncated model (``measure_model(model, inputs)``:
  ``flops_dense`` of the dense model, ``flops_effective`` of the truncated one, i.e. the FLOPs outside the factorised
  layers plus each layer's dense FLOPs times its ``flops_factor``). Speed-up / FLOP ratio uses the
  whole-model ratio (what the whole forward can gain); the targeted layers' own speed-up, timed inside the forward
  with hooks, is set against the targeted ratio.
- timing, as ``int8_speed.py``: 1 torch thread, ``torch.inference_mode``, eval mode; every round gives the variants
  turns strictly in order (one untimed warm-up call each per round), the order rotated each round; each turn is
  ``block`` calls in a row, each timed alone with ``perf_counter`` and ``time.thread_time`` (mlp: 5 calls, the first
  of each turn kept apart as "cold", caches holding the other variant's weights; cnn and minilm: 1 call). Headline:
  the speed-up fp32 / low-rank as the ratio of the round's mean latencies, median [min-max] over rounds; also the
  ratio of per-round medians and of thread CPU time medians (CPU time does not count time other jobs held the core).
- targeted-layer time: after the rounds, forward hooks time the targeted layers (dense Linear/Conv2d, or LowRank)
  for ``--share-iters`` extra forwards; reported: their share of the forward and dense / low-rank time inside them.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Benchmark, fmt_spread, quiet_process, table  # noqa: E402
from _models import BUILDERS, MODELS, Bench, agreement  # noqa: E402
from _timing import interleaved, latency_summary, ratio, time_inside  # noqa: E402

from lightning_compress import LowRankRefactoring  # noqa: E402
from lightning_compress.lowrank import LowRankConv2d, LowRankLinear  # noqa: E402
from lightning_compress.monitor import measure_model  # noqa: E402

BENCHMARK = Benchmark(
    "lowrank_speed",
    __doc__,
    shared={"models": ",".join(MODELS), "rounds": 8, "iters": 0, "share_iters": 7},
    smoke={"rounds": 1, "iters": 1, "share_iters": 1},
    choices={"models": MODELS},
)
ACCEPT_FRACTION = 0.75  # the issue: speed-up >= 0.75 x the FLOP ratio (mlp)
DEFAULT_ITERS = {"mlp": 10, "cnn": 12, "minilm": 4}
DEFAULT_BLOCK = {"mlp": 5, "cnn": 1, "minilm": 1}
LOWRANK = (LowRankLinear, LowRankConv2d)


class EncoderOnly(nn.Module):
    """The MiniLM encoder's ``last_hidden_state`` for ``(input_ids, attention_mask)``."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


#: Per model: LowRankRefactoring's rank_ratio and include, and how the results name them.
TARGETS: dict[str, dict[str, Any]] = {
    "mlp": {"rank_ratio": 0.125, "include": None, "label": "every Linear at rank 128 (rank_ratio 0.125)"},
    "cnn": {"rank_ratio": 0.25, "include": ["conv1", "conv2", "fc1"], "label": "conv1, conv2, fc1 at 0.25"},
    "minilm": {"rank_ratio": 0.25, "include": [r"encoder\.encoder\.layer\..*"], "label": "36 encoder Linears at 0.25"},
}


def timed_model(name: str) -> Bench:
    """The model and batch of ``_models.py``; for MiniLM the encoder alone."""
    bench = BUILDERS[name]()
    if name == "minilm":
        bench.model = EncoderOnly(bench.model.encoder).eval()
        bench.description = "MiniLM encoder only (all-MiniLM-L6-v2), 16 x 64 tokens"
    return bench


def lowrank_copy(model: nn.Module, rank_ratio: float, include: list[str] | None) -> tuple[nn.Module, nn.Module, dict]:
    """(masked full-rank copy, truncated copy, {layer: target rank}) of ``model``."""
    masked = copy.deepcopy(model)
    callback = LowRankRefactoring(rank_ratio=rank_ratio, end_step=1, include=include)
    layers, targets, skipped = callback.prepare(masked)
    if skipped:
        raise RuntimeError(f"layers left dense: {skipped}")
    for name, layer in layers.items():  # the callback's update at end_step: keep the most important components
        keep = torch.zeros_like(layer.rank_mask)
        keep[torch.topk(layer.component_importance(), targets[name]).indices] = True
        layer.set_rank_mask(keep)
    truncated = copy.deepcopy(masked)
    callback.truncate(truncated)
    for name, target in targets.items():
        layer = truncated.get_submodule(name)
        if not isinstance(layer, LOWRANK) or not layer.rank == layer.active_rank == target:
            raise RuntimeError(f"{name} was not truncated to rank {target}: {layer}")
    return masked.eval(), truncated.eval(), targets


def flop_figures(dense: nn.Module, lowrank: nn.Module, targets: dict[str, int], inputs: tuple) -> dict[str, Any]:
    dense_report, lowrank_report = measure_model(dense, inputs), measure_model(lowrank, inputs)
    per_dense = {layer.name: layer.flops_dense for layer in dense_report.layers}
    layers = {}
    for name in targets:
        figures = lowrank.get_submodule(name).compression_figures()
        layers[name] = {
            "weight_shape": list(figures.weight_shape),
            "rank": figures.rank,
            "flops_dense": per_dense[name],
            "flops_factorised": round(per_dense[name] * figures.flops_factor),
            "flop_ratio": 1.0 / figures.flops_factor,
        }
    targeted_dense = sum(v["flops_dense"] for v in layers.values())
    targeted_low = sum(v["flops_factorised"] for v in layers.values())
    return {
        "layers": layers,
        "targeted_flops_dense": targeted_dense,
        "targeted_flops_factorised": targeted_low,
        "targeted_flop_ratio": targeted_dense / targeted_low,
        "model_flops_dense": dense_report.flops_dense,
        "model_flops_lowrank": lowrank_report.flops_effective,
        "model_flop_ratio": dense_report.flops_dense / lowrank_report.flops_effective,
        "params_dense": sum(p.numel() for p in dense.parameters()),
        "params_lowrank": sum(p.numel() for p in lowrank.parameters()),
        "bytes_dense": dense_report.bytes_dense,
        "bytes_lowrank": lowrank_report.bytes_compressed,
    }


def transposed_linears(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose Linear weights keep their shape but sit in memory as their transpose, row-major (the
    layout of a truncated LowRankLinear's factors)."""
    out = copy.deepcopy(model)
    with torch.no_grad():
        for module in out.modules():
            if isinstance(module, nn.Linear):
                module.weight.data = module.weight.data.t().contiguous().t()
    return out


def targeted_time(
    variants: dict[str, nn.Module], names: list[str], inputs: tuple, iters: int, block: int
) -> dict[str, dict[str, Any]]:
    """Per variant, the median over ``iters`` hooked forwards of the time inside each ``names`` layer and in all of
    them (ms), and their share of the forward."""
    layers = {variant: {name: model.get_submodule(name) for name in names} for variant, model in variants.items()}
    timed = time_inside(variants, layers, inputs, iters, block)
    out: dict[str, dict[str, Any]] = {}
    for variant, record in timed.items():
        med = {key: statistics.median(values) for key, values in record.items()}
        share = med["inside"] / med["forward"]
        out[variant] = {"targeted_ms": med["inside"], "forward_ms": med["forward"], "share": share,
                        "layers_ms": {n: med[n] for n in names}}  # fmt: skip
    return out


def measure(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Factorise, check, count FLOPs and time model ``name`` against fp32 (see the header)."""
    bench, spec = timed_model(name), TARGETS[name]
    dense = bench.model.eval()
    masked, lowrank, targets = lowrank_copy(dense, spec["rank_ratio"], spec["include"])
    with torch.inference_mode():
        out_dense, out_masked, out_low = dense(*bench.inputs), masked(*bench.inputs), lowrank(*bench.inputs)
    result: dict[str, Any] = {
        "description": bench.description,
        "data": bench.data,
        "notes": bench.notes,
        "targets": spec["label"],
        "rank_ratio": spec["rank_ratio"],
        "include": spec["include"],
        "target_ranks": targets,
        "checks": {
            "truncated_vs_masked": agreement(out_masked, out_low),
            "lowrank_vs_fp32": agreement(out_dense, out_low),
        },
        "flops": flop_figures(dense, lowrank, targets, bench.inputs),
    }
    del masked
    if name == "minilm":  # FlopCounterMode does not see the fused attention (FACTS.md): say what it leaves out
        batch, tokens = bench.inputs[0].shape
        attention = 6 * batch * 2 * (2 * tokens * tokens * 384)  # QK^T and AV, 6 layers, hidden 384
        f = result["flops"]
        with_attention = (f["model_flops_dense"] + attention) / (f["model_flops_lowrank"] + attention)
        f["attention_flops_not_counted"] = attention
        f["model_flop_ratio_with_attention"] = with_attention
        result["notes"].append(
            f"the whole-model FLOP count misses the encoder's fused attention (scaled_dot_product_attention): "
            f"QK^T and AV add {attention / 1e9:.2f} G to both models, which would make the whole-model FLOP ratio "
            f"{with_attention:.2f}x; embeddings, LayerNorm, GELU and softmax are not counted either"
        )
    # The truncated LowRankLinear keeps its factors in the memory layout CPU GEMMs run fastest (inference_layout);
    # a dense Linear in that same layout tells how much of the speed-up is the layout and how much the rank.
    variants = {"fp32": dense, "lowrank": lowrank, "fp32_same_layout": transposed_linears(dense)}
    iters, block = args.iters or DEFAULT_ITERS[name], DEFAULT_BLOCK[name]
    result.update(iters_per_round=iters, block=block)
    rounds = interleaved(variants, bench.inputs, args.rounds, iters, block, name)
    summary: dict[str, Any] = {n: latency_summary(rounds, n, block) for n in variants}
    low = summary["lowrank"]
    low["speedup_means"] = ratio(rounds, "fp32", "lowrank", statistics.fmean)
    low["speedup_medians"] = ratio(rounds, "fp32", "lowrank", statistics.median)
    low["cpu_speedup"] = ratio(rounds, "fp32", "lowrank", statistics.median, "cpu_ms")
    low["speedup_vs_same_layout_means"] = ratio(rounds, "fp32_same_layout", "lowrank", statistics.fmean)
    flops = result["flops"]
    low["speedup_over_model_flop_ratio"] = low["speedup_means"]["median"] / flops["model_flop_ratio"]
    timed: dict[str, Any] = targeted_time(variants, list(targets), bench.inputs, args.share_iters, block)
    timed["targeted_speedup"] = timed["fp32"]["targeted_ms"] / timed["lowrank"]["targeted_ms"]
    timed["targeted_speedup_over_flop_ratio"] = timed["targeted_speedup"] / flops["targeted_flop_ratio"]
    result.update(summary=summary, targeted_layers_time=timed, rounds=rounds)
    if name == "mlp":
        needed = ACCEPT_FRACTION * flops["model_flop_ratio"]
        result["acceptance"] = {
            "criterion": f"speed-up >= {ACCEPT_FRACTION} x FLOP ratio",
            "flop_ratio": flops["model_flop_ratio"],
            "needed_speedup": needed,
            "measured_speedup": low["speedup_means"]["median"],
            "met": low["speedup_means"]["median"] >= needed,
        }
    return result


def main(argv: list[str] | None = None) -> None:
    run = BENCHMARK.start(argv)
    models = run.items("models")
    if run.args.rounds < 1:
        run.error("--rounds must be >= 1")
    quiet_process(1)
    results = {name: measure(name, run.args) for name in models}
    title = "Low-rank inference speed against fp32, next to the FLOP ratio"
    run.finish({"results": results}, title, _markdown(results, run.args), threads=1)


def _markdown(results: dict[str, Any], args: argparse.Namespace) -> list[str]:
    lines = ["- see the script's header for what is timed, how the rounds are interleaved and how FLOPs are counted."]
    if "mlp" in results:
        acc = results["mlp"]["acceptance"]
        verdict = "**met**" if acc["met"] else "**not met**"
        lines.append(
            f"- acceptance (4 x Linear(1024) at rank 128: speed-up >= {ACCEPT_FRACTION} x FLOP ratio = "
            f"{acc['needed_speedup']:.2f}x): measured {acc['measured_speedup']:.2f}x, {verdict}"
        )
    latency, inside, per_layer, checks = [], [], [], []
    for name, res in results.items():
        s, f, t, c = res["summary"], res["flops"], res["targeted_layers_time"], res["checks"]
        low, tm, lf = s["lowrank"], c["truncated_vs_masked"], c["lowrank_vs_fp32"]
        latency.append([res["description"], res["targets"], fmt_spread(s["fp32"]["median_of_medians_ms"]),
                        fmt_spread(low["median_of_medians_ms"]), f"**{fmt_spread(low['speedup_means'], 2, 'x')}**",
                        fmt_spread(low["speedup_medians"], 2, "x"), fmt_spread(low["cpu_speedup"], 2, "x"),
                        f"{f['model_flop_ratio']:.2f}x", f"{low['speedup_over_model_flop_ratio']:.2f}",
                        f"{fmt_spread(s['fp32_same_layout']['median_of_medians_ms'])}; "
                        f"{fmt_spread(low['speedup_vs_same_layout_means'], 2, 'x')}",
                        f"{f['params_dense']:,} -> {f['params_lowrank']:,}"])  # fmt: skip
        inside.append([res["description"], f"{f['targeted_flop_ratio']:.2f}x ({len(f['layers'])} layers)",
                       f"{t['fp32']['targeted_ms']:.2f} -> {t['lowrank']['targeted_ms']:.2f}",
                       f"{t['targeted_speedup']:.2f}x", f"{t['targeted_speedup_over_flop_ratio']:.2f}",
                       f"{t['fp32']['share']:.0%} / {t['lowrank']['share']:.0%}"])  # fmt: skip
        layers = f["layers"]
        shown = list(layers) if len(layers) <= 8 else [n for n in layers if ".layer.0." in n]
        for layer in shown:
            v, dense_ms, low_ms = layers[layer], t["fp32"]["layers_ms"][layer], t["lowrank"]["layers_ms"][layer]
            shape = "x".join(map(str, v["weight_shape"]))
            per_layer.append([name, f"`{layer}`", shape, v["rank"], f"{v['flop_ratio']:.2f}x",
                              f"{dense_ms:.3f} -> {low_ms:.3f}", f"{dense_ms / low_ms:.2f}x"])  # fmt: skip
        if len(shown) < len(layers):
            per_layer.append([name, f"(layer 0 shown of {len(layers) // len(shown)})", "", "", "", "", ""])
        checks.append([name, res["data"], f"{tm['max_abs_diff']:.1e} ({tm['ref_max_abs']:.3g})", f"{lf['rel_l2']:.3f}",
                       f"{f['model_flops_dense'] / 1e9:.3f} G -> {f['model_flops_lowrank'] / 1e9:.3f} G",
                       f"{f['targeted_flops_dense'] / f['model_flops_dense']:.1%}"])  # fmt: skip
    notes = [f"{name}: {n}" for name, res in results.items() for n in res["notes"]]
    for name, res in results.items():
        cold = {v: s["cold_median_of_medians_ms"]["median"] for v, s in res["summary"].items()
                if "cold_median_of_medians_ms" in s}  # fmt: skip
        if cold:
            notes.append(
                f"{name}: first call of each turn of {res['block']} (caches holding the other variant), median ms: "
                + ", ".join(f"{v} {ms:.2f}" for v, ms in cold.items())
            )
    return [
        *lines,
        "",
        f"## Latency ({args.rounds} interleaved rounds, 1 thread; ms: median of per-round medians [min-max])",
        "",
        *table(
            [
                "model",
                "low-rank targets",
                "fp32 ms",
                "low-rank ms",
                "speed-up: ratio of per-round means, median [min-max]",
                "ratio of medians",
                "CPU-time speed-up",
                "FLOP ratio, whole model",
                "speed-up / FLOP ratio",
                "fp32 with Linear weights in the factors' layout: ms; low-rank speed-up over it",
                "params fp32 -> low-rank",
            ],
            latency,
        ),  # fmt: skip
        "",
        f"## Inside the targeted layers (forward hooks, median of {args.share_iters} forwards)",
        "",
        *table(
            [
                "model",
                "targeted layers: FLOP ratio",
                "their time fp32 -> low-rank ms",
                "their speed-up",
                "speed-up / FLOP ratio",
                "their share of the forward, fp32 / low-rank",
            ],
            inside,
        ),  # fmt: skip
        "",
        "### Per targeted layer (same hooked forwards)",
        "",
        *table(
            ["model", "layer", "weight shape", "rank", "FLOP ratio", "fp32 ms -> low-rank ms", "speed-up"], per_layer
        ),
        "",
        "## Checks (one forward of the timed batch)",
        "",
        *table(
            [
                "model",
                "data",
                "truncated vs masked: max abs diff (max abs)",
                "low-rank vs fp32: rel L2 (truncation error of untrained weights)",
                "whole-model FLOPs counted, fp32 -> low-rank",
                "targeted layers' share of fp32 FLOPs",
            ],
            checks,
        ),  # fmt: skip
        *(["", *(f"- {n}" for n in notes)] if notes else []),
    ]


if __name__ == "__main__":
    main()
