"""A fit under the Lightning namespace named by ``LIGHTNING_COMPRESS_NAMESPACE``, run in its own process.

The worker imports that namespace's Trainer and loggers itself, as a user of that package would, and reports what
it saw as JSON: which namespace lightning_compress chose, the callbacks' base class, and what the fit produced.

Usage: python namespace_worker.py {fit,wandb} OUT_DIR
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from pathlib import Path
from typing import Any

NAMESPACE = {"lightning": "lightning.pytorch", "pytorch_lightning": "pytorch_lightning"}[
    os.environ["LIGHTNING_COMPRESS_NAMESPACE"]
]
pl: Any = importlib.import_module(NAMESPACE)


def build(out: Path, loggers: Any, callbacks: list[Any]) -> tuple[Any, Any]:
    from lightning_compress.data import DigitsDataModule
    from lightning_compress.models import ImageClassifier

    pl.seed_everything(0)
    model = ImageClassifier(image_size=8)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=25,
        limit_val_batches=2,
        log_every_n_steps=5,
        logger=loggers,
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=out,
    )
    trainer.fit(model, datamodule=DigitsDataModule())
    return trainer, model


def common(trainer: Any, callbacks: list[Any]) -> dict[str, Any]:
    import lightning_compress._lightning as seam

    return {
        "chosen": seam.NAMESPACE,
        "trainer_module": type(trainer).__module__,
        "callbacks_are_namespace_callbacks": all(isinstance(c, pl.Callback) for c in callbacks),
        "pytorch_lightning_imported": "pytorch_lightning" in sys.modules,
        "lightning_imported": "lightning" in sys.modules,
    }


def fit(out: Path) -> dict[str, Any]:
    from lightning_compress import (
        CompressionMonitor,
        GradientClipping,
        GradualPruning,
        LearningRateWarmup,
        QuantizationAwareTraining,
    )
    from lightning_compress.quantization import Int8Linear, QATLinear

    callbacks = [
        GradualPruning(0.9, start_step=0, end_step=15, update_every=5, exclude=[r"net\.fc2"]),
        QuantizationAwareTraining(8, 8, start_step=10),
        CompressionMonitor(log_every_n_steps=5, measure_latency=False),
        GradientClipping("adaptive", hold_on=["quantize"], event_steps=3),
        LearningRateWarmup(warmup_steps=5, rewarm_on=["quantize"], rewarm_steps=5),
    ]
    csv = pl.loggers.CSVLogger(out, name="csv", version=0)
    trainer, model = build(out, csv, callbacks)
    metrics = (out / "csv" / "version_0" / "metrics.csv").read_text().splitlines()[0].split(",")
    return {
        **common(trainer, callbacks),
        "sparsity": callbacks[0].sparsity(),
        "qat_layers": isinstance(model.net.fc1, QATLinear),
        "int8_fc1": isinstance(callbacks[1].int8_model.net.fc1, Int8Linear),
        "logged": sorted(key for key in metrics if key.startswith(("compress/", "stabilize/"))),
        "rewarm_start": callbacks[4].rewarm_start,
        "hold_until": callbacks[3].hold_until,
    }


def wandb_fit(out: Path) -> dict[str, Any]:
    import wandb
    from wandb_reader import find_run_dir, read_run

    from lightning_compress import CompressionMonitor, GradualPruning

    callbacks = [GradualPruning(0.5, end_step=10, update_every=5), CompressionMonitor(log_every_n_steps=5)]
    logger = pl.loggers.WandbLogger(save_dir=str(out / "wandb"), offline=True, project="lightning-compress-test")
    trainer, _ = build(out, logger, callbacks)
    wandb.finish()
    run = read_run(find_run_dir(out / "wandb"))
    tables = [p for p in run.files if p.name.endswith(".table.json") and "compress" in str(p)]
    table = json.loads(max(tables).read_text()) if tables else {"data": []}
    return {
        **common(trainer, callbacks),
        "table_layers": [row[0] for row in table["data"]],
        "summary_sparsity": run.summary.get("compress/final/weight_sparsity"),
        "defined_compress_metrics": any(m.get("glob_name") == "compress/*" for m in run.metrics),
    }


if __name__ == "__main__":
    kind, out_dir = sys.argv[1], Path(sys.argv[2])
    result = {"fit": fit, "wandb": wandb_fit}[kind](out_dir)
    (out_dir / "result.json").write_text(json.dumps(result))
