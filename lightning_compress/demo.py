"""`lightning-compress demo`: train the reference CNN on the bundled digits four times (dense; pruned to 90 %;
pruned + int8 quantization-aware training, converted to a real int8 model; low-rank) and show what compression
saved, measured: test accuracy, bytes on disk, FLOPs and latency, each against dense."""

from __future__ import annotations

import argparse
import contextlib
import logging
import statistics
import warnings
from collections.abc import Iterator
from dataclasses import replace
from datetime import datetime
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from lightning_compress._lightning import pl
from lightning_compress.demo_plot import plot
from lightning_compress.demo_train import KINDS, DemoResult, label_of, train
from lightning_compress.monitor.measure import measure_latency_ms

LATENCY_BATCH = 256
TABLE_WIDTH = 120  # the least width the output is laid out for (the table is 111 wide): no cell wraps or is cut


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run the block on one CPU thread, then restore the thread count.

    Training: the CNN is tiny and its batches small, so a second thread only adds synchronisation; on a 2-core
    machine shared with other work a dense fit took 2.2 s on one thread and 12.9 s on two. Latency: one thread is
    the usual serving setting and steadier on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def paired_latency_ms(models: list[torch.nn.Module], batch: torch.Tensor, rounds: int = 15) -> list[float]:
    """Per-image forward latency of each model on ``batch``, measured in alternation (a b a b ...) so that the
    shared machine's load hits all of them alike; the median over rounds."""
    times: list[list[float]] = [[] for _ in models]
    for _ in range(rounds):
        for i, model in enumerate(models):
            times[i].append(measure_latency_ms(model, batch, repeats=3, warmup=1) / len(batch))
    return [statistics.median(t) for t in times]


def render(results: list[DemoResult], epochs: int) -> Table:
    """One row per model; every ratio is against the dense model (the first row)."""
    dense = results[0]
    table = Table(
        title=f"lightning-compress demo: reference CNN on scikit-learn digits (8x8, 10 classes), {epochs} epochs each"
    )
    columns = (
        "model", "test\naccuracy", "vs dense\n(points)", "bytes\non disk", "vs\ndense", "FLOPs per\nimage\n(theory)",
        "vs\ndense", "latency per\nimage (ms)\n(measured)", "speed-up\nvs dense",
    )  # fmt: skip
    rows = [
        [
            r.label,
            f"{100 * r.test_accuracy:.2f} %",
            "" if r is dense else f"{100 * (r.test_accuracy - dense.test_accuracy):+.2f}",
            f"{r.bytes_on_disk:,}",
            f"{r.bytes_on_disk / dense.bytes_on_disk:.2f}x",
            f"{r.flops:,}",
            f"{r.flops / dense.flops:.2f}x",
            f"{r.latency_ms:.4f}",
            f"{dense.latency_ms / r.latency_ms:.2f}x",
        ]
        for r in results
    ]
    for i, column in enumerate(columns):
        table.add_column(column, justify="left" if i == 0 else "right", no_wrap=i > 0)
    for row in rows:
        table.add_row(*row)
    table.caption = (
        "Bytes: the files in the run folder (dense: torch.save of the state dict; the others: save_compressed, bit"
        " mask + non-zero values, int8 codes, thin factors). FLOPs count non-zero weights and kept ranks (theory)."
        f" Latency: measured at batch {LATENCY_BATCH} on 1 CPU thread, all models in alternation; dense zeros run at"
        " dense speed, the int8 model runs integer kernels. vs dense: this / dense; speed-up: dense latency / this."
    )
    return table


@contextlib.contextmanager
def quiet_lightning() -> Iterator[None]:
    """Hide Lightning's start-up chatter (accelerator lines, tips) and one deprecation warning of its own internals,
    so that the demo prints its story; real warnings still show."""
    logger = logging.getLogger(pl.__name__)
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
            yield
    finally:
        logger.setLevel(level)


def new_output_dir(root: Path) -> Path:
    """A fresh folder under ``root`` named for this run: a demo never overwrites an earlier one's files."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    for suffix in ("", *(f"-{i}" for i in range(1, 100))):
        candidate = root / f"run-{stamp}{suffix}"
        if not candidate.exists():
            candidate.mkdir(parents=True)
            return candidate
    raise FileExistsError(f"no free run folder under {root}")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="lightning-compress demo", description=__doc__)
    parser.add_argument("--epochs", type=int, default=8, help="training epochs of each model (default: 8)")
    parser.add_argument("--sparsity", type=float, default=0.9, help="target sparsity of the pruned models (0.9)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--output-dir", type=Path, default=Path("lightning-compress-demo"), help="where runs go")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    args = parser.parse_args(argv)
    if args.epochs < 2:
        parser.error(f"--epochs must be an integer >= 2 (one to learn, one to prune and recover), got {args.epochs}")
    if not 0.0 < args.sparsity < 1.0:
        parser.error(f"--sparsity must be in (0, 1), e.g. 0.9 for 90 % zeros; got {args.sparsity}")
    out = new_output_dir(args.output_dir)
    console = Console(width=max(Console().width, TABLE_WIDTH))  # a narrower terminal wraps lines, loses no digits
    results: list[DemoResult] = []
    models: list[torch.nn.Module] = []
    with quiet_lightning(), one_thread():
        for i, kind in enumerate(KINDS, start=1):
            console.print(
                f"[bold]{i}/{len(KINDS)}[/bold] {label_of(kind, args.sparsity)}: training {args.epochs} epochs"
            )
            result, model = train(kind, args.epochs, args.seed, args.sparsity, not args.no_progress, out)
            console.print(f"    {result.train_seconds:.1f} s, test accuracy {result.test_accuracy:.2%}")
            results.append(result)
            models.append(model)
        batch = torch.randn(LATENCY_BATCH, *models[0].example_input_array.shape[1:])
        latencies = paired_latency_ms(models, batch)
    results = [replace(r, latency_ms=ms) for r, ms in zip(results, latencies, strict=True)]
    console.print(render(results, args.epochs))
    plot(results[0], results[1:], args.epochs, out / "savings.png")
    console.print(f"Saved in {out}:")
    console.print("  " + ", ".join(r.file.name for r in results) + ", savings.png")
    console.print("  (load a .safetensors model with lightning_compress.load_compressed(path))")
    return 0
