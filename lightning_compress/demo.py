"""`lightning-compress demo`: train the reference CNN on the embedded digits data and print what came out."""

from __future__ import annotations

import argparse
import io
import time
from dataclasses import dataclass

import torch
from rich.console import Console
from rich.table import Table

from lightning_compress._lightning import pl
from lightning_compress.data import DigitsDataModule
from lightning_compress.models import ImageClassifier


@dataclass(frozen=True)
class DemoResult:
    test_accuracy: float
    parameters: int
    state_dict_bytes: int
    train_seconds: float
    epochs: int


def state_dict_bytes(module: torch.nn.Module) -> int:
    """Bytes of the module's state dict as ``torch.save`` writes it: what a plain checkpoint of it costs."""
    buffer = io.BytesIO()
    torch.save(module.state_dict(), buffer)
    return buffer.getbuffer().nbytes


def run_demo(epochs: int = 8, seed: int = 0, progress: bool = True) -> DemoResult:
    if epochs < 1:
        raise ValueError(f"`epochs` must be a positive integer, got {epochs!r}.")
    pl.seed_everything(seed, workers=True, verbose=False)
    data = DigitsDataModule(seed=seed)
    model = ImageClassifier(in_channels=data.in_channels, image_size=data.image_size, num_classes=data.num_classes)
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="auto",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=progress,
    )
    start = time.perf_counter()
    trainer.fit(model, datamodule=data)
    train_seconds = time.perf_counter() - start
    (metrics,) = trainer.test(model, datamodule=data, verbose=False)
    return DemoResult(
        test_accuracy=float(metrics["test/acc"]),
        parameters=sum(p.numel() for p in model.parameters()),
        state_dict_bytes=state_dict_bytes(model),
        train_seconds=train_seconds,
        epochs=epochs,
    )


def render(result: DemoResult) -> Table:
    table = Table(title="lightning-compress demo: reference CNN on scikit-learn digits (8x8, 10 classes)")
    table.add_column("metric")
    table.add_column("dense (fp32)", justify="right")
    table.add_row("test accuracy", f"{result.test_accuracy:.2%}")
    table.add_row("parameters", f"{result.parameters:,}")
    table.add_row("model size (state dict)", f"{result.state_dict_bytes / 1024:,.1f} KiB")
    table.add_row("training time", f"{result.train_seconds:.1f} s for {result.epochs} epochs")
    return table


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="lightning-compress demo", description=__doc__)
    parser.add_argument("--epochs", type=int, default=8, help="training epochs (default: 8)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)
    if args.epochs < 1:
        parser.error(f"--epochs must be a positive integer, got {args.epochs}")
    result = run_demo(epochs=args.epochs, seed=args.seed, progress=not args.no_progress)
    Console().print(render(result))
    return 0
