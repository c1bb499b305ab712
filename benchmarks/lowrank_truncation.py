"""Truncating MiniLM's encoder Linears to 48 % of their weights, no fine-tuning: which factor basis, which allocation.

Committed results (benchmarks/results/lowrank_truncation.{json,md}) came from:

    .venv/bin/python benchmarks/lowrank_truncation.py --threads 2

What it compares, each the pretrained all-MiniLM-L6-v2 encoder with its 36 encoder-block Linears (the layers
benchmarks/lowrank_accuracy.py fine-tunes) replaced by a rank-r truncation, the rest untouched:

- basis: `weights` = the plain SVD of W (what LowRankRefactoring uses without `calibration_steps`); `whitened` = the
  SVD of W L with L L^T the layer's input second moment (`lowrank.whitening.whitened_factors`, what it uses with
  `calibration_steps`), the moment taken from `--calibration` training snippets (all 64 positions, padding
  included, as the callback sees them);
- allocation, all at about `--budget` of the weights: `ratio` = every layer the same fraction `--rank-ratio` of
  its rank (`rank_for_ratio`; 0.32 keeps 48.0 % of these weights, as in lowrank_accuracy.py); `equal_share` =
  `ranks_for_budget` (every layer the same share of its spectrum); `energy_per_weight` = the allocation
  `ranks_for_budget` used before (the next direction with the most relative energy per weight first, over all
  layers; reproduced here as `greedy_ranks`).

Measured on the 2,000 held-out Rotten Tomatoes snippets (the first `--limit-test` if set): the mean cosine
similarity of each snippet's mean-pooled embedding to the dense encoder's, and the test accuracy of a logistic
regression fitted on the dense embeddings of the first `--probe-train` training snippets (the dense encoder's probe
reading the truncated encoder's embeddings; and, refitted, a probe of the truncated encoder's own). No step of
training anywhere: this isolates what the truncation keeps, which fine-tuning (benchmarks/lowrank_accuracy.py) then
has to recover.
"""

from __future__ import annotations

import argparse
import copy
import re
import statistics
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Benchmark, table  # noqa: E402
from _models import ENCODER_LINEAR_KINDS, forward_hooks  # noqa: E402
from _training import minilm, rotten_tomatoes  # noqa: E402

from lightning_compress.lowrank import LayerSpectrum, factor, rank_for_ratio, ranks_for_budget  # noqa: E402
from lightning_compress.lowrank.whitening import whitened_factors  # noqa: E402

BENCHMARK = Benchmark(
    "lowrank_truncation",
    __doc__,
    shared={"threads": 1, "limit_test": None},
    options={
        "budget": (0.48, "share of the 36 layers' weights kept"),
        "rank_ratio": (0.32, "the `ratio` allocation's rank_ratio"),
        "calibration": (256, "training snippets for the input moments"),
        "probe_train": (3000, "training snippets the probes are fitted on"),
    },
    smoke={"calibration": 16, "probe_train": 64, "limit_test": 64},
)
BLOCK_LINEARS = r"encoder\.layer\..*"  # inside the HF encoder; `encoder\.encoder\.layer\..*` from MiniLMClassifier
ALLOCATIONS = ("ratio", "equal_share", "energy_per_weight")


def greedy_ranks(spectra: list[LayerSpectrum], budget: float, min_saving: float = 0.1) -> dict[str, int]:
    """The allocation ranks_for_budget used before: rank 1 everywhere, then the direction with the most squared
    singular value (relative to its layer's total) per weight it costs, over all layers, while the budget lasts."""
    allowed = budget * sum(s.dense_params for s in spectra)
    ranks = {s.name: 1 for s in spectra}
    spent = sum(s.params_at(1) for s in spectra)
    candidates = []
    for s in spectra:
        squares = s.singular_values.double().square()
        cost = s.out_features + s.in_features
        for index in range(1, s.max_useful_rank(min_saving)):
            candidates.append((float(squares[index]) / float(squares.sum()) / cost, s.name, index, cost))
    for _score, name, index, cost in sorted(candidates, key=lambda c: -c[0]):
        if ranks[name] == index and spent + cost <= allowed:
            ranks[name] += 1
            spent += cost
    return ranks


def pooled(encoder: nn.Module, ids: torch.Tensor, mask: torch.Tensor, batch: int = 128) -> torch.Tensor:
    out = []
    with torch.inference_mode():
        for i in range(0, len(ids), batch):
            hidden = encoder(input_ids=ids[i : i + batch], attention_mask=mask[i : i + batch]).last_hidden_state
            m = mask[i : i + batch].unsqueeze(-1).to(hidden.dtype)
            out.append((hidden * m).sum(1) / m.sum(1))
    return torch.cat(out)


def input_moments(encoder: nn.Module, layers: dict[str, nn.Linear], ids: torch.Tensor, mask: torch.Tensor):
    """E[x x^T] of every layer's inputs over the calibration snippets (every position, as the callback sees them)."""
    sums = {name: torch.zeros(m.in_features, m.in_features, dtype=torch.float64) for name, m in layers.items()}
    rows = dict.fromkeys(layers, 0)

    def add(name: str, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        x = inputs[0].reshape(-1, inputs[0].shape[-1]).double()
        sums[name] += x.T @ x
        rows[name] += x.shape[0]

    with forward_hooks(layers, after=add):
        pooled(encoder, ids, mask, batch=32)
    return {name: sums[name] / rows[name] for name in layers}


def truncations(layers: dict[str, nn.Linear], moments: dict[str, torch.Tensor], args: argparse.Namespace):
    """Per ``basis/allocation``: the rank of every layer and its rank-r factors (first, second)."""
    for basis in ("weights", "whitened"):
        factors, spectra = {}, []
        for name, m in layers.items():
            first, second, singular = factor(m.weight.detach().double())
            if basis == "whitened":
                rebased = whitened_factors(first, second, moments[name])
                first, second, singular = rebased.first, rebased.second, rebased.singular_values
            factors[name] = (first, second)
            spectra.append(LayerSpectrum(name, m.out_features, m.in_features, singular))
        for allocation in ALLOCATIONS:
            if allocation == "ratio":
                ranks = {s.name: rank_for_ratio(s, args.rank_ratio) for s in spectra}
            elif allocation == "equal_share":
                ranks = ranks_for_budget(spectra, args.budget, 0.1)
            else:
                ranks = greedy_ranks(spectra, args.budget)
            yield f"{basis}/{allocation}", ranks, factors, spectra


def main(argv: list[str] | None = None) -> None:
    run = BENCHMARK.start(argv)
    args = run.args
    from sklearn.linear_model import LogisticRegression

    data = rotten_tomatoes(0)
    train, test = data.train_set, data.test_set
    encoder = minilm(0).encoder.eval()
    layers = {n: m for n, m in encoder.named_modules() if re.fullmatch(BLOCK_LINEARS, n) and isinstance(m, nn.Linear)}
    moments = input_moments(
        encoder, layers, train.input_ids[: args.calibration], train.attention_mask[: args.calibration]
    )
    n_train, n_test = args.probe_train, args.limit_test
    test_ids, test_mask, labels_test = (
        test.input_ids[:n_test],
        test.attention_mask[:n_test],
        test.labels[:n_test].numpy(),
    )
    dense_train = pooled(encoder, train.input_ids[:n_train], train.attention_mask[:n_train]).numpy()
    dense_test = pooled(encoder, test_ids, test_mask)
    labels_train = train.labels[:n_train].numpy()
    probe = LogisticRegression(max_iter=2000).fit(dense_train, labels_train)
    results: dict[str, Any] = {"dense": {"probe_acc": float(probe.score(dense_test.numpy(), labels_test))}}
    dense_weights = sum(m.weight.numel() for m in layers.values())
    for key, ranks, factors, spectra in truncations(layers, moments, args):
        truncated = copy.deepcopy(encoder)
        modules = dict(truncated.named_modules())
        with torch.no_grad():
            for name, rank in ranks.items():
                first, second = factors[name]
                modules[name].weight.copy_((second[:, :rank] @ first[:rank]).float())
        kept = sum(s.params_at(ranks[s.name]) for s in spectra) / dense_weights
        emb_test = pooled(truncated, test_ids, test_mask)
        emb_train = pooled(truncated, train.input_ids[:n_train], train.attention_mask[:n_train]).numpy()
        refit = LogisticRegression(max_iter=2000).fit(emb_train, labels_train)
        r = results[key] = {
            "weights_kept": kept,
            "cosine_to_dense": float(nn.functional.cosine_similarity(emb_test, dense_test).mean()),
            "dense_probe_acc": float(probe.score(emb_test.numpy(), labels_test)),
            "refit_probe_acc": float(refit.score(emb_test.numpy(), labels_test)),
            "ranks": ranks,
            "median_rank_by_kind": median_by_kind(ranks),
        }
        print(
            f"{key}: weights {100 * kept:.1f} %, cosine {r['cosine_to_dense']:.4f}, probe "
            f"{100 * r['dense_probe_acc']:.2f} % (refit {100 * r['refit_probe_acc']:.2f} %)",
            flush=True,
        )
    title = "MiniLM encoder Linears truncated without fine-tuning: factor basis and rank allocation"
    run.finish({"wall_s": run.wall_s(), "results": results}, title, markdown(results, args, len(labels_test)))


def median_by_kind(ranks: dict[str, int]) -> list[float]:
    return [
        statistics.median(r for n, r in ranks.items() if re.fullmatch(r"encoder\.layer\.\d+\." + re.escape(k), n))
        for k in ENCODER_LINEAR_KINDS
    ]


def markdown(results: dict[str, Any], args: Any, n_test: int) -> list[str]:
    rows = [["dense", "100 %", "1", f"{100 * results['dense']['probe_acc']:.2f}", "-", "-"]]
    for key, r in results.items():
        if key != "dense":
            kinds = " / ".join(f"{v:g}" for v in r["median_rank_by_kind"])
            rows.append([key, f"{100 * r['weights_kept']:.1f} %", f"{r['cosine_to_dense']:.4f}",
                         f"{100 * r['dense_probe_acc']:.2f}", f"{100 * r['refit_probe_acc']:.2f}", kinds])  # fmt: skip
    header = ["basis / allocation", "weights kept", "cosine to dense embedding", "dense probe acc %",
              "refitted probe acc %", "median rank q / k / v / attn-out / FFN-in / FFN-out"]  # fmt: skip
    return [
        f"- pretrained all-MiniLM-L6-v2, the 36 encoder-block Linears at about {100 * args.budget:.0f} % of their"
        f" weights (`ratio`: rank_ratio {args.rank_ratio}); input moments from {args.calibration} training snippets;"
        f" {n_test:,} held-out snippets; probes fitted on {args.probe_train} training snippets",
        "",
        *table(header, rows),
        "",
        "`weights` = plain SVD (LowRankRefactoring without `calibration_steps`); `whitened` = SVD of W L (with it)."
        " `equal_share` is `ranks_for_budget`; `energy_per_weight` the greedy it replaced.",
    ]


if __name__ == "__main__":
    main()
