"""CompressionMonitor and measurement: honest figures, logged to CSV and to W&B (read back from its own log)."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from lightning_compress import CompressionMonitor, GradualPruning
from lightning_compress._lightning import pl
from lightning_compress.data import DigitsDataModule
from lightning_compress.models import ImageClassifier
from lightning_compress.monitor import callback as monitor_callback
from lightning_compress.monitor import measure_model
from lightning_compress.packing import packed_nbytes
from lightning_compress.protocol import (
    DescribesCompression,
    HasDenseShape,
    LayerFigures,
    LayerStorage,
    ReportsStorage,
)
from lightning_compress.pruning.patterns import Pattern, compute_masks

SCALARS = (
    "compress/params_dense",
    "compress/params_effective",
    "compress/weight_sparsity",
    "compress/bytes_dense",
    "compress/bytes_compressed",
    "compress/flops_dense",
    "compress/flops_effective",
)


def pruned_linear(pattern: str, sparsity: float) -> nn.Linear:
    torch.manual_seed(0)
    layer = nn.Linear(64, 32)
    mask = compute_masks(Pattern.parse(pattern), "layer", sparsity, {"w": layer.weight.detach()}, {})["w"]
    with torch.no_grad():
        layer.weight.mul_(mask)
    return layer


def test_a_2_4_linear_reports_half_its_dense_flops() -> None:
    (layer,) = measure_model(nn.Sequential(pruned_linear("2:4", 0.5)), torch.zeros(3, 64)).layers
    assert layer.flops_dense == 2 * 64 * 32 * 3
    assert layer.flops_effective == layer.flops_dense // 2


def test_a_90_percent_unstructured_linear_reports_a_tenth_of_its_dense_flops() -> None:
    (layer,) = measure_model(nn.Sequential(pruned_linear("unstructured", 0.9)), torch.zeros(1, 64)).layers
    assert layer.figures.params_effective == round(0.1 * 64 * 32)
    assert layer.flops_effective == pytest.approx(0.1 * layer.flops_dense, rel=1e-3)


def test_model_totals_count_every_parameter_and_byte() -> None:
    model = nn.Sequential(pruned_linear("unstructured", 0.9), nn.ReLU(), nn.Linear(32, 10))
    report = measure_model(model, torch.zeros(1, 64))
    assert report.params_dense == sum(p.numel() for p in model.parameters())
    assert report.params_effective == sum(int(torch.count_nonzero(p)) for p in model.parameters())
    assert report.bytes_dense == 4 * report.params_dense
    assert report.bytes_compressed == sum(packed_nbytes(t) for t in model.state_dict().values())
    assert report.bytes_compressed < 0.5 * report.bytes_dense
    assert report.flops_dense == 2 * 64 * 32 + 2 * 32 * 10  # FlopCounterMode's total agrees with the layer rule


def test_without_an_example_input_flops_are_left_out_not_guessed() -> None:
    metrics = measure_model(nn.Sequential(nn.Linear(4, 4))).metrics()
    assert "compress/flops_dense" not in metrics and "compress/params_dense" in metrics


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"log_every_n_steps": -1}, r"`log_every_n_steps` must be an integer >= 0 .*got -1"),
        ({"log_every_n_steps": 2.5}, r"`log_every_n_steps` must be an integer >= 0 .*got 2\.5"),
        ({"latency_repeats": 0}, r"`latency_repeats` must be an integer >= 1; got 0"),
    ],
)
def test_bad_arguments_are_refused_at_construction(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CompressionMonitor(**kwargs)


def pruned_fit(tmp_path: Path, loggers: list[Any], monitor: CompressionMonitor) -> pl.LightningModule:
    pl.seed_everything(0)
    model = ImageClassifier(image_size=8)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=40,
        val_check_interval=20,
        check_val_every_n_epoch=None,  # validate every 20 optimizer steps, across epochs
        logger=loggers,
        log_every_n_steps=5,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=[GradualPruning(0.9, start_step=0, end_step=30, update_every=10), monitor],
    )
    trainer.fit(model, datamodule=DigitsDataModule())
    return model


def read_csv_metrics(path: Path) -> dict[str, list[tuple[int, float]]]:
    series: dict[str, list[tuple[int, float]]] = {}
    with path.open() as handle:
        for row in csv.DictReader(handle):
            for key, value in row.items():
                if key.startswith("compress/") and value != "":
                    series.setdefault(key, []).append((int(row["step"]), float(value)))
    return series


@pytest.fixture
def offline_wandb(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "wandb_home"
    for var in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        (folder / var.lower()).mkdir(parents=True)
        monkeypatch.setenv(var, str(folder / var.lower()))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    return folder / "wandb_dir"


@pytest.mark.slow
def test_csv_tensorboard_and_wandb_receive_the_same_measured_figures(tmp_path: Path, offline_wandb: Path) -> None:
    import wandb
    from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger, WandbLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from wandb_reader import find_run_dir, read_run

    csv_logger = CSVLogger(tmp_path, name="csv")
    tensorboard_logger = TensorBoardLogger(tmp_path, name="tb")
    wandb_logger = WandbLogger(save_dir=str(offline_wandb), offline=True, project="lightning-compress-test")
    loggers = [csv_logger, tensorboard_logger, wandb_logger]
    model = pruned_fit(tmp_path, loggers, CompressionMonitor(log_every_n_steps=5))
    wandb.finish()
    tensorboard_logger.experiment.flush()
    events = EventAccumulator(tensorboard_logger.log_dir)
    events.Reload()
    final = measure_model(model, model.example_input_array).metrics()

    csv_series = read_csv_metrics(Path(csv_logger.log_dir) / "metrics.csv")
    run = read_run(find_run_dir(offline_wandb))
    for key in SCALARS:
        assert csv_series[key][-1][1] == pytest.approx(final[key]), key
        scalars = [(event.step, event.value) for event in events.Scalars(key)]
        assert [step for step, _ in scalars] == [step for step, _ in csv_series[key]], key
        assert [value for _, value in scalars] == pytest.approx([value for _, value in csv_series[key]], rel=1e-6)
        logged = run.series(key)
        assert [step for step, _ in logged] == [step for step, _ in csv_series[key]], key
        assert [value for _, value in logged] == pytest.approx([value for _, value in csv_series[key]]), key
    assert csv_series["compress/weight_sparsity"][0][1] == 0.0  # measured dense at the start
    assert final["compress/weight_sparsity"] == pytest.approx(0.9, abs=0.005)
    assert final["compress/flops_effective"] < 0.2 * final["compress/flops_dense"]
    assert final["compress/bytes_compressed"] <= 0.2 * final["compress/bytes_dense"]
    assert {"compress/latency_ms_dense", "compress/latency_ms", "compress/peak_memory_mb"} <= csv_series.keys()

    tables = [p for p in run.files if p.name.endswith(".table.json") and "compress" in str(p)]
    assert len(tables) >= 1, run.files
    table = json.loads(max(tables).read_text())
    assert table["columns"][:4] == ["layer", "type", "shape", "sparsity"]
    assert [row[0] for row in table["data"]] == ["net.conv1", "net.conv2", "net.fc1", "net.fc2"]
    total = sum(row[6] for row in table["data"])
    assert sum(row[7] for row in table["data"]) == pytest.approx((1 - 0.9) * total, rel=0.01)
    assert {"glob_name": "compress/*", "step_metric": "trainer/global_step"}.items() <= next(
        m for m in run.metrics if m.get("glob_name") == "compress/*"
    ).items()  # define_metric: compress/* plot against the global step
    assert run.summary["compress/final/weight_sparsity"] == pytest.approx(0.9, abs=0.005)
    assert run.summary["compress/dense/weight_sparsity"] == 0.0


def test_structure_is_remeasured_only_after_a_compression_event(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    original = monitor_callback.measure_model

    def counting(model: nn.Module, example_input: Any = None) -> Any:
        calls.append(model.trainer.global_step)
        return original(model, example_input)

    monkeypatch.setattr(monitor_callback, "measure_model", counting)
    from pytorch_lightning.loggers import CSVLogger

    pruned_fit(tmp_path, [CSVLogger(tmp_path)], CompressionMonitor(log_every_n_steps=1, measure_latency=False))
    # start (0); after the mask updates at steps 10, 20, 30 (the one at step 0 happens before the first log);
    # validation ends at 20 and 40; fit end at 40. Not once per logged step.
    assert calls == [0, 10, 20, 20, 30, 40, 40]


def test_without_example_input_array_the_monitor_warns_once_and_logs_no_flops(tmp_path: Path) -> None:
    from pytorch_lightning.loggers import CSVLogger

    class NoExample(ImageClassifier):
        def __init__(self) -> None:
            super().__init__(image_size=8)
            self.example_input_array = None

    logger = CSVLogger(tmp_path)
    with pytest.warns(UserWarning, match=r"NoExample has no `example_input_array`, so FLOPs and latency") as record:
        pl.Trainer(
            accelerator="cpu",
            max_steps=3,
            logger=logger,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[CompressionMonitor(log_every_n_steps=1)],
        ).fit(NoExample(), datamodule=DigitsDataModule())
    assert sum("example_input_array" in str(w.message) for w in record) == 1
    series = read_csv_metrics(Path(logger.log_dir) / "metrics.csv")
    assert "compress/params_dense" in series and "compress/flops_dense" not in series
    assert "compress/latency_ms" not in series


# ------------------------------------------------------------------------------------------------- quantization


def test_a_quantizing_layer_counts_as_the_int8_layer_it_converts_to(tmp_path: Path) -> None:
    """Before fake quantization a QAT model measures like its float self; once quantizing, exactly like its int8
    conversion, whose bytes are those save_compressed writes; dense figures stay the fp32 model's throughout."""
    from lightning_compress import QuantizationAwareTraining, convert_to_int8, save_compressed

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    with torch.no_grad():
        model[0].weight[:, ::2] = 0.0
    float_report = measure_model(model)
    layers = QuantizationAwareTraining(8, 8).prepare(model)
    for _ in range(3):
        model(torch.randn(16, 64))
    observing = measure_model(model)
    assert (observing.bytes_compressed, observing.params_dense) == (float_report.bytes_compressed, 4810)
    for layer in layers.values():
        layer.enable_fake_quant()
    quantizing, int8 = measure_model(model), measure_model(convert_to_int8(model))
    assert quantizing.bytes_compressed == int8.bytes_compressed < 0.45 * float_report.bytes_compressed
    for report in (quantizing, int8):
        assert (report.params_dense, report.bytes_dense) == (float_report.params_dense, float_report.bytes_dense)
    # the integers' non-zeros: a few small weights round to 0 as well as the pruned ones
    assert quantizing.params_effective == int8.params_effective <= float_report.params_effective
    assert [layer.bytes_compressed for layer in quantizing.layers] == [layer.bytes_compressed for layer in int8.layers]
    from safetensors import safe_open

    save_compressed(convert_to_int8(model), tmp_path / "int8.lc")
    with safe_open(str(tmp_path / "int8.lc"), framework="pt") as file:
        written = sum(file.get_tensor(key).nbytes for key in file.keys())  # noqa: SIM118 (safe_open has no iterator)
    assert written == int8.bytes_compressed


def test_the_logged_bytes_fall_when_quantization_starts(tmp_path: Path) -> None:
    from pytorch_lightning.loggers import CSVLogger

    from lightning_compress import QuantizationAwareTraining

    logger = CSVLogger(tmp_path)
    pl.seed_everything(0)
    pl.Trainer(
        accelerator="cpu",
        max_steps=20,
        logger=logger,
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[QuantizationAwareTraining(8, 8, start_step=10), CompressionMonitor(log_every_n_steps=1)],
    ).fit(ImageClassifier(image_size=8), datamodule=DigitsDataModule())
    series = dict(read_csv_metrics(Path(logger.log_dir) / "metrics.csv")["compress/bytes_compressed"])
    # Quantization starts with the forward of step 10's batch, so the figure logged after that step (11) falls.
    before, after = series[10], series[11]
    assert all(series[step] == before for step in range(1, 11))
    assert after < 0.3 * before  # int8 weights: a quarter of the bytes, plus scales


# ------------------------------------------------------------------------------------- a user's own compressed layer


class BlockDiagonalLinear(nn.Module):
    """A compressed layer defined outside lightning_compress, answering the protocols by its methods alone: two
    diagonal blocks stand for a dense ``[out, in]`` weight (half its weights and FLOPs), and it has no ``weight``."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.blocks = nn.Parameter(torch.randn(2, out_features // 2, in_features // 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("...bi,boi->...bo", x.unflatten(-1, (2, -1)), self.blocks).flatten(-2)

    def dense_weight_shape(self) -> tuple[int, ...]:
        return (self.out_features, self.in_features)

    def compression_figures(self) -> LayerFigures:
        dense = self.out_features * self.in_features
        return LayerFigures(self.dense_weight_shape(), dense, self.blocks.numel(), 32, None, flops_factor=0.5)

    def storage(self) -> LayerStorage:
        dense = self.out_features * self.in_features
        return LayerStorage(dense, self.blocks.numel(), 4 * dense, packed_nbytes(self.blocks.detach()))


def test_a_users_own_layer_is_measured_through_the_protocols_alone() -> None:
    layer = BlockDiagonalLinear(64, 32)
    assert isinstance(layer, DescribesCompression) and isinstance(layer, HasDenseShape)
    assert isinstance(layer, ReportsStorage)
    report = measure_model(nn.Sequential(layer), torch.zeros(3, 64))
    (measured,) = report.layers
    assert (measured.name, measured.type, measured.figures) == ("0", "BlockDiagonalLinear", layer.compression_figures())
    assert measured.flops_dense == 2 * 64 * 32 * 3  # its dense_weight_shape, not the blocks it computes with
    assert measured.flops_effective == measured.flops_dense // 2
    assert (report.flops_dense, report.flops_effective) == (measured.flops_dense, measured.flops_effective)
    assert (report.params_dense, report.params_effective) == (64 * 32, 2 * 16 * 32)  # from storage(), not its tensors
    assert (report.bytes_dense, report.bytes_compressed) == (4 * 64 * 32, packed_nbytes(layer.blocks.detach()))


class Unshaped(BlockDiagonalLinear):
    """Describes its compression, but says neither its dense shape nor keeps a ``weight``."""

    dense_weight_shape = None  # type: ignore[assignment]  # blocks the protocol method, as typing's rules allow


def test_a_compressed_layer_with_no_dense_shape_and_no_weight_is_a_clear_error() -> None:
    assert not isinstance(Unshaped(8, 8), HasDenseShape)
    with pytest.raises(TypeError, match=r"Unshaped has neither `dense_weight_shape\(\)` nor a `weight` tensor.*HINT"):
        measure_model(nn.Sequential(Unshaped(8, 8)), torch.zeros(1, 8))
