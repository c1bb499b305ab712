"""What only a WandbLogger gets: step-aligned metric definitions, a per-layer table and chart, a summary.

``wandb`` is imported only when the trainer has a WandbLogger, so core code never needs it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lightning_compress._lightning import loggers_of, pl
from lightning_compress.monitor.measure import ModelReport

TABLE_COLUMNS = ["layer", "type", "shape", "sparsity", "rank", "bits", "params", "params_effective", "bytes"]


def wandb_loggers(trainer: pl.Trainer) -> list[Any]:
    return loggers_of(trainer, "WandbLogger")


def define_metrics(trainer: pl.Trainer) -> None:
    """Plot every ``compress/*`` metric against the trainer's global step, and keep the last value in the summary."""
    for logger in wandb_loggers(trainer):
        logger.experiment.define_metric("compress/*", step_metric="trainer/global_step", summary="last")


def layer_rows(report: ModelReport) -> list[list[Any]]:
    return [
        [
            layer.name,
            layer.type,
            "x".join(map(str, layer.figures.weight_shape)),
            round(layer.figures.sparsity, 6),
            layer.figures.rank,
            layer.figures.bits,
            layer.figures.params_dense,
            layer.figures.params_effective,
            layer.bytes_compressed,
        ]
        for layer in report.layers
    ]


def log_final(trainer: pl.Trainer, dense: Mapping[str, float], final: ModelReport, metrics: dict[str, float]) -> None:
    """The per-layer table, a per-layer sparsity bar chart, and the dense figures (``dense``: the baseline's
    ``compress/*`` metrics) and the final ones in the run summary."""
    loggers = wandb_loggers(trainer)
    if not loggers:
        return
    import wandb

    table = wandb.Table(columns=TABLE_COLUMNS, data=layer_rows(final))
    chart = wandb.plot.bar(table, "layer", "sparsity", title="Sparsity per layer")
    summary = {f"compress/dense/{k.removeprefix('compress/')}": v for k, v in dense.items()}
    summary.update({f"compress/final/{k.removeprefix('compress/')}": v for k, v in metrics.items()})
    for logger in loggers:
        logger.experiment.log(
            {"compress/layers": table, "compress/layer_sparsity": chart, "trainer/global_step": trainer.global_step}
        )
        logger.experiment.summary.update(summary)
