"""CompressionMonitor: logs what compression saved, measured, to every logger of the trainer."""

from __future__ import annotations

from typing import Any

from typing_extensions import override

from lightning_compress import arguments, events, teardown
from lightning_compress._lightning import Callback, pl, rank_zero_info
from lightning_compress.monitor import baseline, wandb_extras
from lightning_compress.monitor.baseline import DenseBaseline
from lightning_compress.monitor.inputs import FirstForward, ForwardCall
from lightning_compress.monitor.measure import ModelReport, measure_latency_ms, measure_model, peak_memory_mb


class CompressionMonitor(Callback):
    """Log ``compress/*`` metrics: parameters, non-zeros, bytes, FLOPs (theoretical), latency and peak memory.

    Structure (parameters, bytes, FLOPs) is measured at the start of training, then again only after a compression
    event (a technique changed the model; see ``lightning_compress.events``) or at validation end, so a training
    step pays nothing but a dictionary look-up. Latency is measured at each validation end and at fit end.

    FLOPs and latency need inputs. The LightningModule's ``example_input_array`` (Lightning's convention) wins when
    set. Otherwise the monitor records, in the first training batch, the arguments of the first call of the
    LightningModule's ``forward``; when ``training_step`` never calls it (``self.model(**batch)``, the transformers
    idiom), those of the first of its immediate children holding parameters called with tensors, and then FLOPs and
    latency are of a forward of that child. The arguments are kept detached on the CPU (one training batch, once per
    process), so the figures are per forward of one training batch, and appear from the end of the first batch on.
    When nothing could be recorded they are skipped with one warning.

    The dense baseline (every ``*_dense`` figure, and ``compress/dense/*`` in a W&B summary) is captured by
    :meth:`capture_baseline` at this callback's ``setup``, and is part of its ``state_dict``, so a resumed run
    reports the figures its first run captured. Parameters and bytes: measured at capture; a layer that a technique
    swapped in before then counts as the dense layer it describes (``protocol.describe``, ``LayerStorage``), so
    they are the same whatever the callback order. Dense FLOPs: counted at the first measurement that has inputs
    (training start with ``example_input_array``, else the end of the first batch) from the dense weights' shapes
    (``protocol.dense_weight_shape``), so they too are those of the dense model; counted again, once, if a resumed
    run's first batch has other shapes. Dense latency: timed at that same moment, only if no layer has been swapped
    yet (the model is then as dense as it is fast); once QAT or low-rank layers are in the model (they swap at
    ``setup``) the dense model no longer exists, and ``latency_ms_dense`` and ``latency_speedup`` are not logged.

    Metrics go to every logger of the trainer, from rank zero, at the current ``trainer.global_step``. With a
    ``WandbLogger`` the run also gets a per-layer table, a per-layer sparsity chart and dense-vs-compressed figures
    in its summary.

    Args:
        log_every_n_steps: log the (cached) figures every this many optimizer steps; 0 logs only at validation end.
        measure_latency: time the forward pass of the inputs (``example_input_array`` or the recorded call).
        latency_repeats: timed repetitions (the median is logged) after 3 warm-up passes.
    """

    def __init__(self, log_every_n_steps: int = 50, *, measure_latency: bool = True, latency_repeats: int = 20) -> None:
        self.log_every_n_steps = arguments.integer(
            "log_every_n_steps", log_every_n_steps, what="(0 = only at validation end)"
        )
        self.measure_latency = arguments.flag("measure_latency", measure_latency)
        self.latency_repeats = arguments.integer("latency_repeats", latency_repeats, minimum=1)
        self.baseline: DenseBaseline | None = None
        self.report: ModelReport | None = None
        self.latency_ms: float | None = None
        self.recorded: ForwardCall | None = None  # the first training call, when there is no example_input_array
        self._recording: FirstForward | None = None
        self._events_seen = 0
        self._last_logged_step = -1
        self._warned = False

    @property
    def dense(self) -> ModelReport | None:
        """The dense model's structure (the baseline's report), or None before :meth:`capture_baseline`."""
        return None if self.baseline is None else self.baseline.report

    def capture_baseline(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Measure the dense baseline's structure now, unless it is captured already (by an earlier call, or
        restored from a checkpoint). Idempotent; collective under ZeRO-3 (every rank calls it). Call it before any
        technique swaps a layer; ``setup`` calls it too."""
        del trainer  # part of the signature every hook and the coordinator share
        if self.baseline is None:
            self.baseline = baseline.capture(pl_module)

    # ------------------------------------------------------------------------------------------------ hooks

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        teardown.destroy_process_groups_at_exit()  # a finished run's gloo threads are joined before finalization
        self.capture_baseline(trainer, pl_module)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.capture_baseline(trainer, pl_module)  # a no-op unless setup was skipped
        inputs = self._inputs(pl_module)
        self.report = measure_model(pl_module, inputs)
        self._events_seen = len(events.history(trainer))
        if inputs is None:
            self._recording = FirstForward(pl_module)  # on the LightningModule: under DDP the wrapper is called
        else:
            self._complete_baseline(pl_module, inputs)
        if trainer.is_global_zero:
            wandb_extras.define_metrics(trainer)
        self._log(trainer, pl_module)

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        if self._recording is not None:
            self._recording.start()

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._recording is not None:
            self._adopt_recorded_call(trainer, pl_module, self._recording)
        every = self.log_every_n_steps
        step = trainer.global_step
        if every and step % every == 0 and step != self._last_logged_step:  # once per optimizer step
            self._remeasure_if_changed(trainer, pl_module)
            self._log(trainer, pl_module)

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or self.report is None:
            return
        self.report = measure_model(pl_module, self._inputs(pl_module))
        self.latency_ms = self._latency(pl_module)
        self._log(trainer, pl_module)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._recording is not None:  # a fit that ended inside its first batch
            self._recording.stop()
            self._recording = None
        self.report = measure_model(pl_module, self._inputs(pl_module))
        self.latency_ms = self._latency(pl_module)
        self._log(trainer, pl_module)
        if trainer.is_global_zero and self.baseline is not None:
            wandb_extras.log_final(trainer, self.baseline.summary(), self.report, self.metrics(pl_module))

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"baseline": None if self.baseline is None else self.baseline.state_dict()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("baseline") is not None:  # what the first run captured wins over what setup measured
            self.baseline = DenseBaseline.from_state_dict(state_dict["baseline"])

    # ------------------------------------------------------------------------------------------------ figures

    def metrics(self, pl_module: pl.LightningModule) -> dict[str, float]:
        """The current ``compress/*`` figures (structure from the last measurement, dense ones from the baseline)."""
        metrics = self.report.metrics() if self.report else {}
        if self.baseline is not None:
            metrics = self.baseline.applied_to(metrics)
        if self.latency_ms is not None:
            metrics["compress/latency_ms"] = self.latency_ms
            if self.baseline is not None and self.baseline.latency_ms:
                metrics["compress/latency_speedup"] = self.baseline.latency_ms / self.latency_ms
        peak, _ = peak_memory_mb(pl_module.device)
        metrics["compress/peak_memory_mb"] = peak
        return metrics

    def _adopt_recorded_call(self, trainer: pl.Trainer, pl_module: pl.LightningModule, recording: FirstForward) -> None:
        """End of the first training batch: stop recording; measure with the call recorded, or warn once."""
        self.recorded = recording.stop()
        self._recording = None
        if self.recorded is None:
            self._warn_no_inputs(pl_module)
            return
        self.report = measure_model(pl_module, self.recorded)
        self._events_seen = len(events.history(trainer))
        self._complete_baseline(pl_module, self.recorded)

    def _complete_baseline(self, pl_module: pl.LightningModule, inputs: ForwardCall) -> None:
        """The baseline's FLOPs (from the report just measured with ``inputs``) and its latency, where still due."""
        dense, signature = self.baseline, inputs.signature()
        if dense is None or self.report is None or self.report.flops_dense is None:
            return
        if dense.flops_inputs != signature:
            if dense.flops is not None:
                rank_zero_info(
                    f"CompressionMonitor: the inputs are now {signature}, not the {dense.flops_inputs} the dense"
                    " FLOPs were counted for (a resumed run's first batch): dense FLOPs counted again for them."
                )
            dense.flops, dense.flops_inputs = self.report.flops_dense, signature
        if dense.latency_ms is None and self.measure_latency and not baseline.holds_swapped_layers(pl_module):
            dense.latency_ms = measure_latency_ms(pl_module, inputs, repeats=self.latency_repeats)

    def _remeasure_if_changed(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        published = len(events.history(trainer))
        if published != self._events_seen:
            self._events_seen = published
            self.report = measure_model(pl_module, self._inputs(pl_module))

    def _log(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last_logged_step = trainer.global_step
        if not trainer.is_global_zero:
            return
        metrics = self.metrics(pl_module)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    def _latency(self, pl_module: pl.LightningModule) -> float | None:
        inputs = self._inputs(pl_module)
        if not self.measure_latency or inputs is None:
            return None
        return measure_latency_ms(pl_module, inputs, repeats=self.latency_repeats)

    def _inputs(self, pl_module: pl.LightningModule) -> ForwardCall | None:
        """``example_input_array`` when set, else the recorded first training call, else None."""
        example = pl_module.example_input_array
        return self.recorded if example is None else ForwardCall.of(example)

    def _warn_no_inputs(self, pl_module: pl.LightningModule) -> None:
        if self._warned:
            return
        self._warned = True
        name = type(pl_module).__name__
        pl.utilities.rank_zero_warn(
            f"CompressionMonitor: {name} has no `example_input_array`, so FLOPs and latency are not measured: the"
            f" first training batch called neither {name}.forward nor a child module holding parameters with tensors."
            " HINT: set `self.example_input_array = torch.zeros(1, ...)` in its __init__ (a tuple for several"
            " arguments, a dict for keyword arguments)."
        )
