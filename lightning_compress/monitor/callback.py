"""CompressionMonitor: logs what compression saved, measured, to every logger of the trainer."""

from __future__ import annotations

from typing import Any

from typing_extensions import override

from lightning_compress import arguments, events, teardown
from lightning_compress._lightning import Callback, pl
from lightning_compress.monitor import wandb_extras
from lightning_compress.monitor.measure import ModelReport, measure_latency_ms, measure_model, peak_memory_mb


class CompressionMonitor(Callback):
    """Log ``compress/*`` metrics: parameters, non-zeros, bytes, FLOPs (theoretical), latency and peak memory.

    Structure (parameters, bytes, FLOPs) is measured at the start of training, then again only after a compression
    event (a technique changed the model; see ``lightning_compress.events``) or at validation end, so a training
    step pays nothing but a dictionary look-up. Latency is measured at the start (the dense model) and at each
    validation end and fit end (the model as it is then). FLOPs and latency need the LightningModule's
    ``example_input_array`` (Lightning's convention); without it they are skipped with one warning.

    Metrics go to every logger of the trainer, from rank zero, at the current ``trainer.global_step``. With a
    ``WandbLogger`` the run also gets a per-layer table, a per-layer sparsity chart and dense-vs-compressed figures
    in its summary.

    Args:
        log_every_n_steps: log the (cached) figures every this many optimizer steps; 0 logs only at validation end.
        measure_latency: time the forward pass of ``example_input_array``.
        latency_repeats: timed repetitions (the median is logged) after 3 warm-up passes.
    """

    def __init__(self, log_every_n_steps: int = 50, *, measure_latency: bool = True, latency_repeats: int = 20) -> None:
        self.log_every_n_steps = arguments.integer(
            "log_every_n_steps", log_every_n_steps, what="(0 = only at validation end)"
        )
        self.measure_latency = arguments.flag("measure_latency", measure_latency)
        self.latency_repeats = arguments.integer("latency_repeats", latency_repeats, minimum=1)
        self.dense: ModelReport | None = None
        self.report: ModelReport | None = None
        self.latency_dense_ms: float | None = None
        self.latency_ms: float | None = None
        self._events_seen = 0
        self._last_logged_step = -1
        self._warned = False

    # ------------------------------------------------------------------------------------------------ hooks

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        teardown.destroy_process_groups_at_exit()  # a finished run's gloo threads are joined before finalization
        self.dense = self.report = measure_model(pl_module, self._example(pl_module))
        self._events_seen = len(events.history(trainer))
        self.latency_dense_ms = self._latency(pl_module)
        if trainer.is_global_zero:
            wandb_extras.define_metrics(trainer)
        self._log(trainer, pl_module)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        every = self.log_every_n_steps
        step = trainer.global_step
        if every and step % every == 0 and step != self._last_logged_step:  # once per optimizer step
            self._remeasure_if_changed(trainer, pl_module)
            self._log(trainer, pl_module)

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or self.dense is None:
            return
        self.report = measure_model(pl_module, self._example(pl_module))
        self.latency_ms = self._latency(pl_module)
        self._log(trainer, pl_module)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.report = measure_model(pl_module, self._example(pl_module))
        self.latency_ms = self._latency(pl_module)
        self._log(trainer, pl_module)
        if trainer.is_global_zero and self.dense is not None:
            wandb_extras.log_final(trainer, self.dense, self.report, self.metrics(pl_module))

    # ------------------------------------------------------------------------------------------------ figures

    def metrics(self, pl_module: pl.LightningModule) -> dict[str, float]:
        """The current ``compress/*`` figures (structure from the last measurement)."""
        metrics = self.report.metrics() if self.report else {}
        if self.latency_dense_ms is not None:
            metrics["compress/latency_ms_dense"] = self.latency_dense_ms
        if self.latency_ms is not None:
            metrics["compress/latency_ms"] = self.latency_ms
            if self.latency_dense_ms:
                metrics["compress/latency_speedup"] = self.latency_dense_ms / self.latency_ms
        peak, _ = peak_memory_mb(pl_module.device)
        metrics["compress/peak_memory_mb"] = peak
        return metrics

    def _remeasure_if_changed(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        published = len(events.history(trainer))
        if published != self._events_seen:
            self._events_seen = published
            self.report = measure_model(pl_module, self._example(pl_module))

    def _log(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last_logged_step = trainer.global_step
        if not trainer.is_global_zero:
            return
        metrics = self.metrics(pl_module)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    def _latency(self, pl_module: pl.LightningModule) -> float | None:
        example = self._example(pl_module)
        if not self.measure_latency or example is None:
            return None
        return measure_latency_ms(pl_module, example, repeats=self.latency_repeats)

    def _example(self, pl_module: pl.LightningModule) -> Any:
        example = pl_module.example_input_array
        if example is None and not self._warned:
            self._warned = True
            pl.utilities.rank_zero_warn(
                f"CompressionMonitor: {type(pl_module).__name__} has no `example_input_array`, so FLOPs and latency"
                " are not measured. HINT: set `self.example_input_array = torch.zeros(1, ...)` in its __init__."
            )
        return example
