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

Measured on the 2,000 held-out Rotten Tomatoes snippets: the mean cosine similarity of each snippet's mean-pooled
embedding to the dense encoder's, and the test accuracy of a logistic regression fitted on the dense embeddings of
the first `--probe-train` training snippets (the dense encoder's probe reading the truncated encoder's embeddings;
and, refitted, a probe of the truncated encoder's own). No step of training anywhere: this isolates what the
truncation keeps, which fine-tuning (benchmarks/lowrank_accuracy.py) then has to recover.
"""

from __future__ import annotations

import argparse
import copy
import re
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import command_line, env_markdown, environment, set_threads, write_results  # noqa: E402

from lightning_compress.lowrank import LayerSpectrum, factor, rank_for_ratio, ranks_for_budget  # noqa: E402
from lightning_compress.lowrank.whitening import whitened_factors  # noqa: E402

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

    def hook(name: str):
        def add(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            x = inputs[0].reshape(-1, inputs[0].shape[-1]).double()
            sums[name] += x.T @ x
            rows[name] += x.shape[0]

        return add

    handles = [m.register_forward_hook(hook(n)) for n, m in layers.items()]
    try:
        pooled(encoder, ids, mask, batch=32)
    finally:
        for h in handles:
            h.remove()
    return {name: sums[name] / rows[name] for name in layers}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--budget", type=float, default=0.48, help="share of the 36 layers' weights kept")
    parser.add_argument("--rank-ratio", type=float, default=0.32, help="the `ratio` allocation's rank_ratio")
    parser.add_argument("--calibration", type=int, default=256, help="training snippets for the input moments")
    parser.add_argument("--probe-train", type=int, default=3000, help="training snippets the probes are fitted on")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--name", default="lowrank_truncation", help="results file stem under benchmarks/results/")
    args = parser.parse_args()
    set_threads(args.threads)
    from sklearn.linear_model import LogisticRegression

    from lightning_compress.data import RottenTomatoesDataModule
    from lightning_compress.models import MiniLMClassifier

    command = command_line()
    t0 = time.perf_counter()
    data = RottenTomatoesDataModule(batch_size=32, seed=0)
    data.setup("fit")
    train, test = data.train_set, data.test_set
    encoder = MiniLMClassifier().encoder.eval()
    layers = {n: m for n, m in encoder.named_modules() if re.fullmatch(BLOCK_LINEARS, n) and isinstance(m, nn.Linear)}
    moments = input_moments(
        encoder, layers, train.input_ids[: args.calibration], train.attention_mask[: args.calibration]
    )
    n_train = args.probe_train
    dense_train = pooled(encoder, train.input_ids[:n_train], train.attention_mask[:n_train]).numpy()
    dense_test = pooled(encoder, test.input_ids, test.attention_mask)
    labels_train, labels_test = train.labels[:n_train].numpy(), test.labels.numpy()
    probe = LogisticRegression(max_iter=2000).fit(dense_train, labels_train)
    results: dict[str, Any] = {"dense": {"probe_acc": float(probe.score(dense_test.numpy(), labels_test))}}
    dense_weights = sum(m.weight.numel() for m in layers.values())
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
            truncated = copy.deepcopy(encoder)
            modules = dict(truncated.named_modules())
            with torch.no_grad():
                for name, rank in ranks.items():
                    first, second = factors[name]
                    modules[name].weight.copy_((second[:, :rank] @ first[:rank]).float())
            kept = sum(s.params_at(ranks[s.name]) for s in spectra) / dense_weights
            emb_test = pooled(truncated, test.input_ids, test.attention_mask)
            emb_train = pooled(truncated, train.input_ids[:n_train], train.attention_mask[:n_train]).numpy()
            refit = LogisticRegression(max_iter=2000).fit(emb_train, labels_train)
            key = f"{basis}/{allocation}"
            results[key] = {
                "weights_kept": kept,
                "cosine_to_dense": float(nn.functional.cosine_similarity(emb_test, dense_test).mean()),
                "dense_probe_acc": float(probe.score(emb_test.numpy(), labels_test)),
                "refit_probe_acc": float(refit.score(emb_test.numpy(), labels_test)),
                "ranks": ranks,
                "median_rank_by_kind": median_by_kind(ranks),
            }
            r = results[key]
            print(
                f"{key}: weights {100 * kept:.1f} %, cosine {r['cosine_to_dense']:.4f}, probe "
                f"{100 * r['dense_probe_acc']:.2f} % (refit {100 * r['refit_probe_acc']:.2f} %)",
                flush=True,
            )
    env = environment(args.threads)
    payload = {"benchmark": "lowrank_truncation", "command": command, "environment": env, "settings": vars(args),
               "wall_s": time.perf_counter() - t0, "results": results}  # fmt: skip
    md = markdown(results, env, command, args)
    write_results(args.name, payload, md)
    print(md)


KINDS = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
         "intermediate.dense", "output.dense")  # fmt: skip


def median_by_kind(ranks: dict[str, int]) -> list[float]:
    import statistics

    return [
        statistics.median(r for n, r in ranks.items() if re.fullmatch(r"encoder\.layer\.\d+\." + re.escape(k), n))
        for k in KINDS
    ]


def markdown(results: dict[str, Any], env: dict[str, Any], command: str, args: Any) -> str:
    lines = [
        "# MiniLM encoder Linears truncated without fine-tuning: factor basis and rank allocation",
        "",
        env_markdown(env, command).rstrip(),
        f"- pretrained all-MiniLM-L6-v2, the 36 encoder-block Linears at about {100 * args.budget:.0f} % of their"
        f" weights (`ratio`: rank_ratio {args.rank_ratio});"
        f" input moments from {args.calibration} training snippets; 2,000 held-out snippets; probes fitted on"
        f" {args.probe_train} training snippets",
        "",
        "| basis / allocation | weights kept | cosine to dense embedding | dense probe acc % | refitted probe acc % "
        "| median rank q / k / v / attn-out / FFN-in / FFN-out |",
        "|---|---|---|---|---|---|",
        f"| dense | 100 % | 1 | {100 * results['dense']['probe_acc']:.2f} | - | - |",
    ]
    for key, r in results.items():
        if key == "dense":
            continue
        kinds = " / ".join(f"{v:g}" for v in r["median_rank_by_kind"])
        lines.append(
            f"| {key} | {100 * r['weights_kept']:.1f} % | {r['cosine_to_dense']:.4f} | {100 * r['dense_probe_acc']:.2f}"
            f" | {100 * r['refit_probe_acc']:.2f} | {kinds} |"
        )
    lines += [
        "",
        "`weights` = plain SVD (LowRankRefactoring without `calibration_steps`); `whitened` = SVD of W L (with it)."
        " `equal_share` is `ranks_for_budget`; `energy_per_weight` the greedy it replaced.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
