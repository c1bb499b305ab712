"""Inference speed of truncated low-rank models (LowRankRefactoring) against fp32, next to their FLOP ratios.

Committed results (benchmarks/results/lowrank_speed.{json,md}) came from:

    .venv/bin/python benchmarks/lowrank_speed.py --rounds 8

Issue acceptance (low-rank refactoring): "4x Linear(1024) MLP at rank 128: measured speed-up >= 0.75x of the FLOP
ratio (benchmark, one run)".

- models (the inputs and weights of ``int8_speed.py``, built by its functions): ``mlp`` = 4 x Linear(1024, 1024) with
  ReLU between them, batch 64, every Linear at rank 128 (``rank_ratio=0.125``); ``cnn`` = ``ReferenceCNN``
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
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import env_markdown, environment, set_threads, spread, write_results  # noqa: E402
from int8_speed import Bench, _cnn_bench, _minilm_bench, _mlp_bench, agreement, time_inference_round  # noqa: E402

from lightning_compress import LowRankRefactoring  # noqa: E402
from lightning_compress.lowrank import LowRankConv2d, LowRankLinear  # noqa: E402
from lightning_compress.monitor import measure_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("mlp", "cnn", "minilm")
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


def _mlp() -> tuple[Bench, dict[str, Any]]:
    bench = _mlp_bench()
    return bench, {"rank_ratio": 0.125, "include": None, "label": "every Linear at rank 128 (rank_ratio 0.125)"}


def _cnn() -> tuple[Bench, dict[str, Any]]:
    bench = _cnn_bench()
    return bench, {"rank_ratio": 0.25, "include": ["conv1", "conv2", "fc1"], "label": "conv1, conv2, fc1 at 0.25"}


def _minilm() -> tuple[Bench, dict[str, Any]]:
    bench = _minilm_bench()
    bench.model = EncoderOnly(bench.model.encoder).eval()
    bench.description = "MiniLM encoder only (all-MiniLM-L6-v2), 16 x 64 tokens"
    return bench, {
        "rank_ratio": 0.25,
        "include": [r"encoder\.encoder\.layer\..*"],
        "label": "36 encoder Linears at 0.25",
    }


BUILDERS: dict[str, Callable[[], tuple[Bench, dict[str, Any]]]] = {"mlp": _mlp, "cnn": _cnn, "minilm": _minilm}


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
    """Per variant, the median over ``iters`` forwards of the time inside each ``names`` layer and in all of them (ms),
    and their share of the forward. Variants take turns; each turn runs ``block`` forwards and times the last."""
    times: dict[str, dict[str, float]] = {v: {} for v in variants}
    record: dict[str, list[float]] = {}
    starts: dict[str, float] = {}
    hooks = []
    for variant, model in variants.items():
        for name in names:
            key = f"{variant}/{name}"
            module = model.get_submodule(name)
            hooks.append(
                module.register_forward_pre_hook(lambda m, i, k=key: starts.__setitem__(k, time.perf_counter()))
            )
            hooks.append(
                module.register_forward_hook(
                    lambda m, i, o, k=key: times[k.split("/")[0]].__setitem__(
                        k.split("/", 1)[1], time.perf_counter() - starts[k]
                    )
                )
            )
    try:
        with torch.inference_mode():
            for _ in range(iters):
                for variant, model in variants.items():
                    for _ in range(block):
                        t0 = time.perf_counter()
                        model(*inputs)
                        total = time.perf_counter() - t0
                    record.setdefault(f"{variant}/forward", []).append(1e3 * total)
                    record.setdefault(f"{variant}/targeted", []).append(1e3 * sum(times[variant].values()))
                    for name, seconds in times[variant].items():
                        record.setdefault(f"{variant}/{name}", []).append(1e3 * seconds)
    finally:
        for h in hooks:
            h.remove()
    out: dict[str, dict[str, Any]] = {}
    for variant in variants:
        med = {k.split("/", 1)[1]: statistics.median(v) for k, v in record.items() if k.startswith(variant + "/")}
        out[variant] = {
            "targeted_ms": med["targeted"],
            "forward_ms": med["forward"],
            "share": med["targeted"] / med["forward"],
            "layers_ms": {n: med[n] for n in names},
        }
    return out


def run(name: str, args: argparse.Namespace) -> dict[str, Any]:
    bench, spec = BUILDERS[name]()
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
    names = list(variants)
    rounds = []
    for r in range(args.rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        rounds.append(time_inference_round(variants, bench.inputs, order, iters, block))
        med = {n: statistics.median(rounds[-1][n]["wall_ms"]) for n in names}
        print(f"[{name}] round {r} ({order[0]} first): " + ", ".join(f"{n} {med[n]:.2f} ms" for n in names), flush=True)
    summary: dict[str, Any] = {}
    for n in names:
        summary[n] = {
            "median_of_medians_ms": spread([statistics.median(rd[n]["wall_ms"]) for rd in rounds]),
            "mean_ms": spread([statistics.fmean(rd[n]["wall_ms"]) for rd in rounds]),
            "cpu_median_of_medians_ms": spread([statistics.median(rd[n]["cpu_ms"]) for rd in rounds]),
        }
        if block > 1:
            summary[n]["cold_median_of_medians_ms"] = spread(
                [statistics.median(rd[n]["cold_wall_ms"]) for rd in rounds]
            )
    low = summary["lowrank"]
    low["speedup_means"] = spread(
        [statistics.fmean(rd["fp32"]["wall_ms"]) / statistics.fmean(rd["lowrank"]["wall_ms"]) for rd in rounds]
    )
    low["speedup_medians"] = spread(
        [statistics.median(rd["fp32"]["wall_ms"]) / statistics.median(rd["lowrank"]["wall_ms"]) for rd in rounds]
    )
    low["cpu_speedup"] = spread(
        [statistics.median(rd["fp32"]["cpu_ms"]) / statistics.median(rd["lowrank"]["cpu_ms"]) for rd in rounds]
    )
    low["speedup_vs_same_layout_means"] = spread(
        [
            statistics.fmean(rd["fp32_same_layout"]["wall_ms"]) / statistics.fmean(rd["lowrank"]["wall_ms"])
            for rd in rounds
        ]
    )
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=8, help="interleaved rounds per model")
    parser.add_argument("--iters", type=int, default=0, help="turns per variant per round (0: per-model default)")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of " + ",".join(MODELS))
    parser.add_argument("--share-iters", type=int, default=7, help="forwards timed with hooks on the targeted layers")
    parser.add_argument("--name", default="lowrank_speed", help="results file stem under benchmarks/results/")
    args = parser.parse_args()
    models = [m for m in args.models.split(",") if m]
    if unknown := set(models) - set(MODELS):
        parser.error(f"unknown models {sorted(unknown)}; choose from {MODELS}")
    if args.rounds < 1:
        parser.error("--rounds must be >= 1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    set_threads(1)
    try:
        script = Path(sys.argv[0]).resolve().relative_to(ROOT).as_posix()
    except ValueError:
        script = "benchmarks/lowrank_speed.py"
    command = " ".join([".venv/bin/python", script, *sys.argv[1:]])
    results = {name: run(name, args) for name in models}
    env = environment(1)
    payload = {"benchmark": "lowrank_speed", "command": command, "environment": env, "settings": vars(args),
               "results": results}  # fmt: skip
    md = _markdown(results, env, command, args)
    json_path, md_path = write_results(args.name, payload, md)
    print(md)
    print(f"wrote {json_path.relative_to(ROOT)} and {md_path.relative_to(ROOT)}")


def _fmt(s: dict[str, float], digits: int = 2, suffix: str = "") -> str:
    return f"{s['median']:.{digits}f}{suffix} [{s['min']:.{digits}f}-{s['max']:.{digits}f}]"


def _markdown(results: dict[str, Any], env: dict[str, Any], command: str, args: argparse.Namespace) -> str:
    lines = [
        "# Low-rank inference speed against fp32, next to the FLOP ratio",
        "",
        env_markdown(env, command).rstrip(),
        "- see the script's header for what is timed, how the rounds are interleaved and how FLOPs are counted.",
    ]
    if "mlp" in results:
        acc = results["mlp"]["acceptance"]
        verdict = "**met**" if acc["met"] else "**not met**"
        lines.append(
            f"- acceptance (4 x Linear(1024) at rank 128: speed-up >= {ACCEPT_FRACTION} x FLOP ratio = "
            f"{acc['needed_speedup']:.2f}x): measured {acc['measured_speedup']:.2f}x, {verdict}"
        )
    lines += [
        "",
        f"## Latency ({args.rounds} interleaved rounds, 1 thread; ms: median of per-round medians [min-max])",
        "",
        "| model | low-rank targets | fp32 ms | low-rank ms | speed-up: ratio of per-round means, median [min-max] "
        "| ratio of medians | CPU-time speed-up | FLOP ratio, whole model | speed-up / FLOP ratio "
        "| fp32 with Linear weights in the factors' layout: ms; low-rank speed-up over it "
        "| params fp32 -> low-rank |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for res in results.values():
        s, f = res["summary"], res["flops"]
        low = s["lowrank"]
        lines.append(
            f"| {res['description']} | {res['targets']} | {_fmt(s['fp32']['median_of_medians_ms'])} "
            f"| {_fmt(low['median_of_medians_ms'])} | **{_fmt(low['speedup_means'], 2, 'x')}** "
            f"| {_fmt(low['speedup_medians'], 2, 'x')} | {_fmt(low['cpu_speedup'], 2, 'x')} "
            f"| {f['model_flop_ratio']:.2f}x | {low['speedup_over_model_flop_ratio']:.2f} "
            f"| {_fmt(s['fp32_same_layout']['median_of_medians_ms'])}; "
            f"{_fmt(low['speedup_vs_same_layout_means'], 2, 'x')} "
            f"| {f['params_dense']:,} -> {f['params_lowrank']:,} |"
        )
    lines += [
        "",
        f"## Inside the targeted layers (forward hooks, median of {args.share_iters} forwards)",
        "",
        "| model | targeted layers: FLOP ratio | their time fp32 -> low-rank ms | their speed-up | speed-up / FLOP "
        "ratio | their share of the forward, fp32 / low-rank |",
        "|---|---|---|---|---|---|",
    ]
    for res in results.values():
        t, f = res["targeted_layers_time"], res["flops"]
        lines.append(
            f"| {res['description']} | {f['targeted_flop_ratio']:.2f}x ({len(f['layers'])} layers) "
            f"| {t['fp32']['targeted_ms']:.2f} -> {t['lowrank']['targeted_ms']:.2f} | {t['targeted_speedup']:.2f}x "
            f"| {t['targeted_speedup_over_flop_ratio']:.2f} | {t['fp32']['share']:.0%} / {t['lowrank']['share']:.0%} |"
        )
    lines += [
        "",
        "### Per targeted layer (same hooked forwards)",
        "",
        "| model | layer | weight shape | rank | FLOP ratio | fp32 ms -> low-rank ms | speed-up |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, res in results.items():
        t, layers = res["targeted_layers_time"], res["flops"]["layers"]
        shown = list(layers) if len(layers) <= 8 else [n for n in layers if ".layer.0." in n]
        for layer in shown:
            v = layers[layer]
            dense_ms, low_ms = t["fp32"]["layers_ms"][layer], t["lowrank"]["layers_ms"][layer]
            lines.append(
                f"| {name} | `{layer}` | {'x'.join(map(str, v['weight_shape']))} | {v['rank']} "
                f"| {v['flop_ratio']:.2f}x | {dense_ms:.3f} -> {low_ms:.3f} | {dense_ms / low_ms:.2f}x |"
            )
        if len(shown) < len(layers):
            lines.append(f"| {name} | (layer 0 shown of {len(layers) // len(shown)}) | | | | | |")
    lines += [
        "",
        "## Checks (one forward of the timed batch)",
        "",
        "| model | data | truncated vs masked: max abs diff (max abs) | low-rank vs fp32: rel L2 (truncation error "
        "of untrained weights) | whole-model FLOPs counted, fp32 -> low-rank | targeted layers' share of fp32 FLOPs |",
        "|---|---|---|---|---|---|",
    ]
    for name, res in results.items():
        c = res["checks"]
        tm, lf = c["truncated_vs_masked"], c["lowrank_vs_fp32"]
        f = res["flops"]
        lines.append(
            f"| {name} | {res['data']} | {tm['max_abs_diff']:.1e} ({tm['ref_max_abs']:.3g}) | {lf['rel_l2']:.3f} "
            f"| {f['model_flops_dense'] / 1e9:.3f} G -> {f['model_flops_lowrank'] / 1e9:.3f} G "
            f"| {f['targeted_flops_dense'] / f['model_flops_dense']:.1%} |"
        )
    notes = [f"{name}: {n}" for name, res in results.items() for n in res["notes"]]
    for name, res in results.items():
        cold = {v: s["cold_median_of_medians_ms"]["median"] for v, s in res["summary"].items()
                if "cold_median_of_medians_ms" in s}  # fmt: skip
        if cold:
            notes.append(
                f"{name}: first call of each turn of {res['block']} (caches holding the other variant), median ms: "
                + ", ".join(f"{v} {ms:.2f}" for v, ms in cold.items())
            )
    if notes:
        lines += ["", *(f"- {n}" for n in notes)]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
