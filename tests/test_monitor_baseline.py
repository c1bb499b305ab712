"""The monitor's dense baseline: measured before any technique changes the model, the same in any callback order,
checkpointed, and restored on resume (read back from the CSV logs)."""

from __future__ import annotations

import csv
import dataclasses
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from lightning_compress import CompressionMonitor, GradualPruning, LowRankRefactoring, QuantizationAwareTraining
from lightning_compress._lightning import Callback, pl
from lightning_compress.data import DigitsDataModule
from lightning_compress.models import ImageClassifier
from lightning_compress.monitor import measure_model
from lightning_compress.monitor.baseline import DenseBaseline
from lightning_compress.monitor.inputs import ForwardCall

DENSE_KEYS = ("compress/params_dense", "compress/bytes_dense", "compress/flops_dense", "compress/latency_ms_dense")
BATCH = torch.zeros(64, 1, 8, 8)  # the digits' first training batch, as the monitor records it


class NoExample(ImageClassifier):
    """Most modules set no ``example_input_array``: FLOPs come from the first training batch."""

    def __init__(self) -> None:
        super().__init__(image_size=8)
        self.example_input_array = None


def logged(path: Path) -> dict[str, list[float]]:
    """Every ``compress/*`` value in a CSVLogger's metrics file, by name, in step order."""
    values: dict[str, list[float]] = {}
    for row in csv.DictReader(io.StringIO(path.read_text())):
        for key, value in row.items():
            if key.startswith("compress/") and value != "":
                values.setdefault(key, []).append(float(value))
    return values


def run(
    folder: Path,
    callbacks: list[Callback],
    *,
    max_steps: int = 6,
    model: pl.LightningModule | None = None,
    ckpt_path: Path | None = None,
    **trainer: Any,
) -> dict[str, list[float]]:
    from pytorch_lightning.loggers import CSVLogger

    pl.seed_everything(0)
    logger = CSVLogger(folder, name="csv")
    pl.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        logger=logger,
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=folder,
        callbacks=callbacks,
        **{"enable_checkpointing": False, **trainer},
    ).fit(model or NoExample(), datamodule=DigitsDataModule(), ckpt_path=ckpt_path)
    return logged(Path(logger.log_dir) / "metrics.csv")


def only(values: list[float]) -> float:
    (value,) = set(values)
    return value


def test_a_resumed_run_logs_the_dense_baseline_of_the_uninterrupted_run(tmp_path: Path) -> None:
    """Resumed at step 19 (the first epoch's last batch), after the masks of steps 0 and 10 are in the checkpoint:
    the resumed run measures a 60 %-sparse model at its start, yet logs the dense figures the first run captured,
    latency included (a re-measured latency would differ in its last digits)."""
    from pytorch_lightning.callbacks import ModelCheckpoint

    def callbacks() -> list[Callback]:
        return [
            GradualPruning(0.9, start_step=0, end_step=30, update_every=10),
            CompressionMonitor(log_every_n_steps=5, latency_repeats=3),
        ]

    saver = ModelCheckpoint(tmp_path / "ckpt", "{step}", every_n_train_steps=19, save_top_k=-1)
    whole = run(tmp_path / "whole", [*callbacks(), saver], max_steps=40, enable_checkpointing=True)
    resumed = run(tmp_path / "resumed", callbacks(), max_steps=40, ckpt_path=tmp_path / "ckpt" / "step=19.ckpt")
    dense = measure_model(NoExample(), ForwardCall(args=(BATCH,), module="net"))
    assert only(whole["compress/params_dense"]) == dense.params_dense
    assert only(whole["compress/bytes_dense"]) == dense.bytes_dense
    assert only(whole["compress/flops_dense"]) == dense.flops_dense
    for key in DENSE_KEYS:
        assert only(resumed[key]) == only(whole[key]), key
    assert resumed["compress/weight_sparsity"][0] > 0.5  # it did start from the compressed model
    assert resumed["compress/latency_speedup"][-1] == only(whole[DENSE_KEYS[-1]]) / resumed["compress/latency_ms"][-1]


def test_the_baseline_survives_a_checkpoint_that_is_loaded_weights_only(tmp_path: Path) -> None:
    monitor = CompressionMonitor(log_every_n_steps=1, latency_repeats=2)
    run(tmp_path, [monitor], max_steps=2)
    assert monitor.baseline is not None and monitor.baseline.flops and monitor.baseline.latency_ms
    torch.save(monitor.state_dict(), tmp_path / "state.pt")
    restored = CompressionMonitor()
    restored.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    assert restored.baseline == monitor.baseline


def test_restored_figures_win_over_measuring_again(tmp_path: Path) -> None:
    """What a checkpoint brings is not measured again: setup, training start and the first batch keep it; only
    FLOPs counted for other inputs (a resumed run's first batch of another shape) are counted again."""
    dense = measure_model(NoExample())
    odd = dataclasses.replace(dense, params_dense=12345, bytes_dense=678)
    signature = ForwardCall(args=(BATCH,), module="").signature()
    state = DenseBaseline(odd, flops=777, flops_inputs=signature, latency_ms=3.5).state_dict()
    monitor = CompressionMonitor(log_every_n_steps=1)
    monitor.load_state_dict({"baseline": state})
    values = run(tmp_path / "same", [monitor], max_steps=3)
    assert [only(values[key]) for key in DENSE_KEYS] == [12345, 678, 777, 3.5]

    state["flops_inputs"] = "<model>(torch.float32[16, 1, 8, 8]; keywords: )"
    monitor = CompressionMonitor(log_every_n_steps=1)
    monitor.load_state_dict({"baseline": state})
    values = run(tmp_path / "other", [monitor], max_steps=3)
    expected = measure_model(NoExample(), BATCH).flops_dense
    assert only(values["compress/flops_dense"]) == expected != 777
    assert [only(values[key]) for key in (DENSE_KEYS[0], DENSE_KEYS[1], DENSE_KEYS[3])] == [12345, 678, 3.5]


TECHNIQUES: dict[str, Callable[[], Callback]] = {
    "qat": lambda: QuantizationAwareTraining(8, 8, start_step=2),
    "lowrank": lambda: LowRankRefactoring(rank_ratio=0.5, start_step=0, end_step=4, update_every=2),
}


@pytest.mark.parametrize("technique", sorted(TECHNIQUES))
def test_the_dense_params_and_bytes_are_the_same_before_or_after_a_technique_that_swaps_layers(
    tmp_path: Path, technique: str
) -> None:
    """The technique swaps its layers at ``setup``: before the monitor's own ``setup`` in one order, after it in the
    other. Both log the dense model's figures, those of a run with no technique at all."""
    make = TECHNIQUES[technique]
    alone = run(tmp_path / "alone", [CompressionMonitor(log_every_n_steps=1, latency_repeats=2)])
    first = run(tmp_path / "first", [make(), CompressionMonitor(log_every_n_steps=1, latency_repeats=2)])
    last = run(tmp_path / "last", [CompressionMonitor(log_every_n_steps=1, latency_repeats=2), make()])
    for key in DENSE_KEYS[:3]:
        assert only(first[key]) == only(last[key]) == only(alone[key]), key
    # the dense model's latency exists only while no layer is swapped: measured alone, in neither order here
    assert "compress/latency_ms_dense" in alone
    assert "compress/latency_ms_dense" not in first and "compress/latency_ms_dense" not in last
    assert "compress/latency_speedup" not in first and "compress/latency_ms" in first


class CaptureFirst(Callback):
    """What a coordinator at the first compression callback's ``setup`` does: every monitor captures its baseline
    before any technique swaps a layer."""

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for callback in trainer.callbacks:
            if isinstance(callback, CompressionMonitor):
                callback.capture_baseline(trainer, pl_module)


def test_a_baseline_captured_before_the_swaps_is_the_plain_model_and_capturing_again_changes_nothing(
    tmp_path: Path,
) -> None:
    monitor = CompressionMonitor(measure_latency=False)
    run(tmp_path, [CaptureFirst(), QuantizationAwareTraining(8, 8), monitor])
    assert monitor.dense is not None
    assert {layer.type for layer in monitor.dense.layers} == {"Conv2d", "Linear"}
    assert monitor.dense.weight_sparsity == 0.0
    captured = monitor.baseline
    monitor.capture_baseline(None, NoExample())  # type: ignore[arg-type]  # idempotent: nothing is measured
    assert monitor.baseline is captured


@pytest.mark.parametrize("technique", sorted(TECHNIQUES))
def test_layers_swapped_before_the_capture_count_as_the_dense_layers_they_replace(technique: str) -> None:
    plain, swapped = NoExample(), NoExample()
    TECHNIQUES[technique]().prepare(swapped)  # type: ignore[attr-defined]
    before, after = CompressionMonitor(), CompressionMonitor()
    before.capture_baseline(None, plain)  # type: ignore[arg-type]
    after.capture_baseline(None, swapped)  # type: ignore[arg-type]
    assert before.dense is not None and after.dense is not None
    assert all(layer.type.startswith(("QAT", "LowRank")) for layer in after.dense.layers)
    assert (after.dense.params_dense, after.dense.bytes_dense) == (before.dense.params_dense, before.dense.bytes_dense)
