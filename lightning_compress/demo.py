"""`lightning-compress demo`: train the reference CNN on the bundled digits twice, dense and pruned to 90 %, and
show what compression saved, measured: accuracy, parameters, non-zeros, bytes on disk, FLOPs, latency."""

from __future__ import annotations

import argparse
import io
import statistics
import time
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from lightning_compress._lightning import pl
from lightning_compress.data import DigitsDataModule
from lightning_compress.models import ImageClassifier
from lightning_compress.monitor.measure import measure_latency_ms, measure_model


@dataclass(frozen=True)
class DemoResult:
    """One trained model, measured."""

    label: str
    test_accuracy: float
    parameters: int
    nonzeros: int
    bytes_on_disk: int
    flops: int
    latency_ms: float
    train_seconds: float


def state_dict_bytes(module: torch.nn.Module) -> int:
    """Bytes of the module's state dict as ``torch.save`` writes it: what a plain dense checkpoint costs."""
    buffer = io.BytesIO()
    torch.save(module.state_dict(), buffer)
    return buffer.getbuffer().nbytes


def train(
    epochs: int, seed: int, progress: bool, sparsity: float | None, out: Path
) -> tuple[DemoResult, torch.nn.Module]:
    """Train on digits (pruned gradually to ``sparsity`` when given), test, save and measure."""
    from lightning_compress import GradualPruning, save_compressed

    pl.seed_everything(seed, workers=True, verbose=False)
    data = DigitsDataModule(seed=seed)
    model = ImageClassifier(in_channels=data.in_channels, image_size=data.image_size, num_classes=data.num_classes)
    steps = epochs * 19  # 1,168 training images at batch 64
    callbacks = []
    if sparsity is not None:  # prune from a quarter to two thirds of training, then recover
        callbacks.append(GradualPruning(sparsity, start_step=steps // 4, end_step=2 * steps // 3, update_every=5))
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="auto",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=progress,
        callbacks=callbacks,
    )
    start = time.perf_counter()
    trainer.fit(model, datamodule=data)
    train_seconds = time.perf_counter() - start
    (metrics,) = trainer.test(model, datamodule=data, verbose=False)
    if sparsity is None:
        bytes_on_disk = state_dict_bytes(model)
    else:
        bytes_on_disk = save_compressed(model, out / "pruned_model.safetensors")
    report = measure_model(model, model.example_input_array)
    result = DemoResult(
        label="dense (fp32)" if sparsity is None else f"pruned {sparsity:.0%}",
        test_accuracy=float(metrics["test/acc"]),
        parameters=report.params_dense,
        nonzeros=report.params_effective,
        bytes_on_disk=bytes_on_disk,
        flops=report.flops_effective or 0,
        latency_ms=float("nan"),  # measured for both models together, see paired_latency_ms
        train_seconds=train_seconds,
    )
    return result, model


def paired_latency_ms(models: list[torch.nn.Module], batch: torch.Tensor, rounds: int = 15) -> list[float]:
    """Per-image forward latency of each model on ``batch``, measured in alternation (a b a b ...) so that the
    shared machine's load hits all of them alike; the median over rounds."""
    times: list[list[float]] = [[] for _ in models]
    for _ in range(rounds):
        for i, model in enumerate(models):
            times[i].append(measure_latency_ms(model, batch, repeats=3, warmup=1) / len(batch))
    return [statistics.median(t) for t in times]


def render(dense: DemoResult, pruned: DemoResult) -> Table:
    table = Table(title="lightning-compress demo: reference CNN on scikit-learn digits (8x8, 10 classes)")
    for column, justify in (("", "left"), (dense.label, "right"), (pruned.label, "right"), ("ratio", "right")):
        table.add_column(column, justify=justify)

    def row(name: str, a: float, b: float, fmt: str, ratio: bool = True) -> None:
        table.add_row(name, fmt.format(a), fmt.format(b), f"{b / a:.2f}x" if ratio and a else "")

    row("test accuracy", 100 * dense.test_accuracy, 100 * pruned.test_accuracy, "{:.2f} %", ratio=False)
    row("parameters", dense.parameters, pruned.parameters, "{:,}")
    row("non-zero parameters", dense.nonzeros, pruned.nonzeros, "{:,}")
    row("bytes on disk", dense.bytes_on_disk, pruned.bytes_on_disk, "{:,}")
    row("FLOPs per image (theoretical)", dense.flops, pruned.flops, "{:,}")
    row("latency per image, measured (ms)", dense.latency_ms, pruned.latency_ms, "{:.4f}")
    row("training time (s)", dense.train_seconds, pruned.train_seconds, "{:.1f}")
    table.caption = (
        "Dense checkpoint: torch.save of the state dict. Pruned: save_compressed (bit mask + non-zero values).\n"
        "FLOPs count the non-zero weights (theoretical); latency is measured, and dense zeros run at dense speed."
    )
    return table


def plot(dense: DemoResult, pruned: DemoResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["non-zero params", "bytes on disk", "FLOPs (theor.)", "latency (meas.)"]
    ratios = [
        pruned.nonzeros / dense.nonzeros,
        pruned.bytes_on_disk / dense.bytes_on_disk,
        pruned.flops / dense.flops,
        pruned.latency_ms / dense.latency_ms,
    ]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    bars = ax.barh(names[::-1], ratios[::-1], color=["#7a9cc6", "#e3a857", "#5fa55a", "#4c72b0"])
    ax.axvline(1.0, color="grey", linestyle="--", linewidth=1)
    ax.bar_label(bars, labels=[f"{r:.2f}x" for r in ratios[::-1]], padding=3)
    ax.set_xlim(0, max(1.15, max(ratios) * 1.2))
    ax.set_xlabel(f"{pruned.label} / dense  (test accuracy {pruned.test_accuracy:.1%} vs {dense.test_accuracy:.1%})")
    ax.set_title(f"What gradual pruning ({pruned.label}) saved on the reference CNN")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


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
    parser.add_argument("--sparsity", type=float, default=0.9, help="target sparsity of the pruned model (0.9)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--output-dir", type=Path, default=Path("lightning-compress-demo"), help="where runs go")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    args = parser.parse_args(argv)
    if args.epochs < 2:
        parser.error(f"--epochs must be an integer >= 2 (one to learn, one to prune and recover), got {args.epochs}")
    if not 0.0 < args.sparsity < 1.0:
        parser.error(f"--sparsity must be in (0, 1), e.g. 0.9 for 90 % zeros; got {args.sparsity}")
    out = new_output_dir(args.output_dir)
    console = Console()
    console.print(f"[bold]1/2[/bold] training the dense reference CNN for {args.epochs} epochs")
    dense, dense_model = train(args.epochs, args.seed, not args.no_progress, None, out)
    console.print(f"[bold]2/2[/bold] training it again, pruned gradually to {args.sparsity:.0%}")
    pruned, pruned_model = train(args.epochs, args.seed, not args.no_progress, args.sparsity, out)
    batch = torch.randn(256, *dense_model.example_input_array.shape[1:])
    dense_ms, pruned_ms = paired_latency_ms([dense_model, pruned_model], batch)
    dense, pruned = replace(dense, latency_ms=dense_ms), replace(pruned, latency_ms=pruned_ms)
    console.print(render(dense, pruned))
    plot(dense, pruned, out / "savings.png")
    console.print(f"Saved: {out / 'pruned_model.safetensors'} (load_compressed), {out / 'savings.png'}")
    return 0
