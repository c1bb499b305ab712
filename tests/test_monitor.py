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


class NoCall(pl.LightningModule):
    """Computes with its parameter directly: neither its forward nor any child module is ever called."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(64, 10))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(x.flatten(1) @ self.weight, y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def quiet_fit(tmp_path: Path, module: pl.LightningModule, callbacks: list[Any], data: Any, **trainer: Any) -> Path:
    """Fit ``module`` on ``data`` (a DataModule or a train DataLoader) with a CSVLogger; the metrics file's path."""
    from pytorch_lightning.loggers import CSVLogger

    logger = CSVLogger(tmp_path, version=0)  # known before the fit: ddp_spawn's processes write it
    settings = {"max_steps": 3, "log_every_n_steps": 1, **trainer}
    fit = pl.Trainer(
        accelerator="cpu",
        logger=logger,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        **settings,
    ).fit
    if isinstance(data, pl.LightningDataModule):
        fit(module, datamodule=data)
    else:
        fit(module, train_dataloaders=data)
    return Path(logger.log_dir) / "metrics.csv"


def test_when_no_forward_call_can_be_recorded_the_monitor_warns_once_and_logs_no_flops(tmp_path: Path) -> None:
    with pytest.warns(UserWarning, match=r"NoCall has no `example_input_array`, so FLOPs and latency") as record:
        path = quiet_fit(tmp_path, NoCall(), [CompressionMonitor(log_every_n_steps=1)], DigitsDataModule())
    assert sum("example_input_array" in str(w.message) for w in record) == 1
    series = read_csv_metrics(path)
    assert "compress/params_dense" in series and "compress/flops_dense" not in series
    assert "compress/latency_ms" not in series


# ----------------------------------------------------------------------------- inputs without example_input_array


class NoExample(ImageClassifier):
    """The reference classifier as most modules are written: ``training_step`` calls ``self(x)``, no example."""

    def __init__(self) -> None:
        super().__init__(image_size=8)
        self.example_input_array = None


class InnerCall(pl.LightningModule):
    """``training_step`` calls ``self.net(x)``, never ``self(x)``; a parameterless child is called first."""

    def __init__(self) -> None:
        super().__init__()
        from lightning_compress.models import ReferenceCNN

        self.scale = nn.Identity()  # holds no parameters: never taken for the model
        self.net = ReferenceCNN(1, 8, 10)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.net(self.scale(x)), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize("module", [NoExample, InnerCall])
def test_without_example_input_array_flops_and_latency_come_from_the_first_training_batch(
    tmp_path: Path, module: type[pl.LightningModule]
) -> None:
    """The first batch of the digits is 64 images of 1x8x8: the figures are those of one forward of such a batch,
    through the LightningModule (``self(x)``) or through the child that ``training_step`` calls."""
    pl.seed_everything(0)
    model = module()
    monitor = CompressionMonitor(log_every_n_steps=1, latency_repeats=2)
    pruning = GradualPruning(0.5, start_step=0, end_step=2, update_every=1)
    series = read_csv_metrics(quiet_fit(tmp_path, model, [pruning, monitor], DigitsDataModule()))
    expected = measure_model(model.net, torch.zeros(64, 1, 8, 8)).metrics()
    assert series["compress/flops_effective"][-1][1] == pytest.approx(expected["compress/flops_effective"])
    assert series["compress/flops_dense"][-1][1] == pytest.approx(expected["compress/flops_dense"])
    assert series["compress/flops_effective"][-1][1] < 0.6 * series["compress/flops_dense"][-1][1]
    assert series["compress/flops_effective"][0][0] == 1  # from the end of the first batch on
    assert {"compress/latency_ms", "compress/latency_ms_dense"} <= series.keys()
    assert monitor.recorded is not None and monitor.recorded.module == ("" if module is NoExample else "net")
    assert [tuple(t.shape) for t in monitor.recorded.args] == [(64, 1, 8, 8)]


def test_example_input_array_wins_over_the_recorded_call(tmp_path: Path) -> None:
    pl.seed_everything(0)
    model = ImageClassifier(image_size=8)  # example_input_array: one image
    monitor = CompressionMonitor(log_every_n_steps=1, measure_latency=False)
    series = read_csv_metrics(quiet_fit(tmp_path, model, [monitor], DigitsDataModule()))
    assert monitor.recorded is None
    expected = measure_model(model, model.example_input_array).flops_dense
    assert {value for _, value in series["compress/flops_dense"]} == {expected}


class TinyBert(pl.LightningModule):
    """A transformers classifier as people fine-tune one: ``training_step`` calls ``self.model(**batch)``."""

    def __init__(self) -> None:
        super().__init__()
        from transformers import BertConfig, BertForSequenceClassification

        config = BertConfig(
            vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
        )
        self.model = BertForSequenceClassification(config)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.model(**batch).loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def token_batches(count: int = 16, length: int = 12) -> Any:
    generator = torch.Generator().manual_seed(0)
    rows = [
        {
            "input_ids": torch.randint(0, 100, (length,), generator=generator),
            "attention_mask": torch.ones(length, dtype=torch.long),
            "labels": torch.tensor(i % 2),
        }
        for i in range(count)
    ]
    return torch.utils.data.DataLoader(rows, batch_size=4)


def test_a_transformers_model_called_with_keyword_arguments_logs_its_flops(tmp_path: Path) -> None:
    pl.seed_everything(0)
    module = TinyBert()
    monitor = CompressionMonitor(log_every_n_steps=1, latency_repeats=2)
    series = read_csv_metrics(quiet_fit(tmp_path, module, [monitor], token_batches()))
    assert monitor.recorded is not None and monitor.recorded.module == "model"
    assert sorted(monitor.recorded.kwargs) == ["attention_mask", "input_ids", "labels"]
    first = next(iter(token_batches()))
    expected = measure_model(module.model, first).metrics()  # a dict: keyword arguments
    assert series["compress/flops_effective"][-1][1] == pytest.approx(expected["compress/flops_effective"])
    linear = sum(m.in_features * m.out_features for m in module.model.bert.encoder.modules() if type(m) is nn.Linear)
    assert series["compress/flops_dense"][-1][1] >= 2 * linear * 4 * 12  # every token through every encoder Linear


def test_a_transformers_conv1d_counts_as_the_linear_it_is() -> None:
    """GPT-2's Conv1D holds its weight as ``(in, out)`` and computes ``x @ W + b``: ``2 x in x out`` per row."""
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv = Conv1D(32, 64)  # nf (out), nx (in): weight [64, 32]
    with torch.no_grad():
        conv.weight[::2] = 0.0  # every other input row
    report = measure_model(nn.Sequential(conv), torch.zeros(3, 5, 64))
    (layer,) = report.layers
    assert layer.figures.weight_shape == (32, 64)  # read as (out, in)
    assert layer.flops_dense == 2 * 64 * 32 * 15 == report.flops_dense  # FlopCounterMode's addmm agrees
    assert layer.flops_effective == layer.flops_dense // 2 == report.flops_effective


# ------------------------------------------------------------------------------------------- recording one call


class Outer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Identity()
        self.inner = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor, *, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.inner(self.scale(x if mask is None else x * mask))


def hook_count(module: nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) for m in module.modules())


def test_the_first_call_is_recorded_detached_on_the_cpu_with_args_and_kwargs_and_the_hooks_removed() -> None:
    from lightning_compress.monitor.inputs import FirstForward

    model = Outer()
    x, mask = torch.randn(2, 4, requires_grad=True), torch.ones(2, 4)
    recording = FirstForward(model)
    recording.start()
    expected = model(x, mask=mask)
    model(torch.zeros(5, 4))  # a later call changes nothing
    assert hook_count(model) == 0  # the root's call removes every hook at once
    call = recording.stop()
    assert call is not None and call.module == ""
    (arg,) = call.args
    assert torch.equal(arg, x) and arg is not x and not arg.requires_grad and arg.device.type == "cpu"
    assert list(call.kwargs) == ["mask"] and torch.equal(call.kwargs["mask"], mask)
    assert torch.equal(call.run(model), expected)


def test_without_a_root_call_the_first_child_with_parameters_is_recorded() -> None:
    from lightning_compress.monitor.inputs import FirstForward

    model = Outer()
    recording = FirstForward(model)
    recording.start()
    model.scale(torch.ones(1, 4))  # no parameters: not the model
    model.inner(torch.ones(7, 4))
    call = recording.stop()
    assert call is not None and call.module == "inner" and call.args[0].shape == (7, 4)
    assert hook_count(model) == 0
    assert call.run(model).shape == (7, 3)

    recording = FirstForward(model)
    recording.start()
    model.inner(torch.ones(7, 4))
    model(torch.ones(2, 4))  # the root's call, even a later one, wins: the inner one was made from training_step
    call = recording.stop()
    assert call is not None and call.module == "" and call.args[0].shape == (2, 4)


def test_a_batch_encoding_a_tuple_and_a_call_with_no_tensors_are_recorded_as_they_are() -> None:
    from transformers import BatchEncoding

    from lightning_compress.monitor.inputs import FirstForward, ForwardCall

    class TakesAnything(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.ones(()))

        def forward(self, *args: Any, **kwargs: Any) -> Any:
            return args, kwargs

    model = TakesAnything()
    encoding = BatchEncoding({"input_ids": torch.arange(6).reshape(2, 3), "attention_mask": torch.ones(2, 3)})
    for args, kwargs in [((encoding,), {}), ((), dict(encoding)), ((torch.ones(2), (torch.zeros(1), 3)), {})]:
        recording = FirstForward(model)
        recording.start()
        model("no tensors", flag=True)  # not a call worth recording
        model(*args, **kwargs)
        call = recording.stop()
        assert call is not None
        got_args, got_kwargs = call.run(model)
        assert [type(a) for a in got_args] == [type(a) for a in args] and got_kwargs.keys() == kwargs.keys()
        assert ForwardCall(got_args, got_kwargs).signature() == ForwardCall(args, kwargs).signature()
    assert isinstance(call.args[1], tuple) and call.args[1][1] == 3
    assert ForwardCall.of(torch.zeros(2)).args[0].shape == (2,) and ForwardCall.of({"a": 1}).kwargs == {"a": 1}


@pytest.mark.slow
def test_under_ddp_each_rank_records_the_call_on_the_lightning_module(tmp_path: Path) -> None:
    monitor = CompressionMonitor(log_every_n_steps=1, measure_latency=False)
    path = quiet_fit(tmp_path, NoExample(), [monitor], DigitsDataModule(), strategy="ddp_spawn", devices=2)
    series = read_csv_metrics(path)
    expected = measure_model(ImageClassifier(image_size=8).net, torch.zeros(64, 1, 8, 8)).flops_dense
    assert series["compress/flops_dense"][-1][1] == expected  # one rank's batch of 64, through the module's forward


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


class DescribedOnly(BlockDiagonalLinear):
    """Describes its compression but reports no storage."""

    storage = None  # type: ignore[assignment]  # blocks the protocol method


def test_a_compressed_layer_without_storage_counts_as_the_dense_layer_it_describes() -> None:
    layer = DescribedOnly(64, 32)
    assert not isinstance(layer, ReportsStorage)
    report = measure_model(nn.Sequential(layer), torch.zeros(1, 64))
    assert (report.params_dense, report.bytes_dense) == (64 * 32, 4 * 64 * 32)  # its description, not its blocks
    assert (report.params_effective, report.bytes_compressed) == (2 * 16 * 32, packed_nbytes(layer.blocks.detach()))


class Unshaped(BlockDiagonalLinear):
    """Describes its compression, but says neither its dense shape nor keeps a ``weight``."""

    dense_weight_shape = None  # type: ignore[assignment]  # blocks the protocol method, as typing's rules allow


def test_a_compressed_layer_with_no_dense_shape_and_no_weight_is_a_clear_error() -> None:
    assert not isinstance(Unshaped(8, 8), HasDenseShape)
    with pytest.raises(TypeError, match=r"Unshaped has neither `dense_weight_shape\(\)` nor a `weight` tensor.*HINT"):
        measure_model(nn.Sequential(Unshaped(8, 8)), torch.zeros(1, 8))
