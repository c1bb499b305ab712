"""QuantizationAwareTraining (first cut): surgery at setup, the observe-then-quantize schedule, exact resume."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from digits_fits import fit, whole_and_resumed
from torch import nn

from lightning_compress import GradualPruning
from lightning_compress._lightning import Callback, pl
from lightning_compress.data import DigitsDataModule
from lightning_compress.models import ImageClassifier
from lightning_compress.quantization import QATConv2d, QATLinear
from lightning_compress.quantization.callback import QuantizationAwareTraining


class Flags(Callback):
    """Records, before every step's forward, each QAT layer's flags and the weight ranges of net.fc1."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        layer = pl_module.net.fc1
        self.rows.append(
            {
                "step": trainer.global_step,
                "fake_quant": bool(layer.fake_quant_enabled),
                "observing": bool(layer.weight_observer.enabled),
                "fc1_max": layer.weight_observer.max_val.clone(),
                "bn_training": [m.training for m in pl_module.modules() if isinstance(m, nn.BatchNorm2d)],
            }
        )


def test_setup_swaps_linear_and_conv_layers_keeping_their_parameters(quiet_trainer_kwargs: dict[str, Any]) -> None:
    pl.seed_everything(0)
    model = ImageClassifier(image_size=8)
    before = {name: p for name, p in model.named_parameters()}
    qat = QuantizationAwareTraining(weight_bits=8, activation_bits=8, exclude=[r"net\.fc2"])
    pl.Trainer(max_steps=2, callbacks=[qat], **quiet_trainer_kwargs).fit(model, datamodule=DigitsDataModule())
    assert isinstance(model.net.conv1, QATConv2d) and isinstance(model.net.fc1, QATLinear)
    assert type(model.net.fc2) is nn.Linear  # excluded
    assert sorted(qat.layers) == ["net.conv1", "net.conv2", "net.fc1"]
    after = dict(model.named_parameters())
    assert after.keys() == before.keys() and all(after[n] is before[n] for n in before)


def test_observes_before_start_step_then_quantizes_then_freezes_ranges(quiet_trainer_kwargs: dict[str, Any]) -> None:
    flags = Flags()
    qat = QuantizationAwareTraining(weight_bits=4, activation_bits=8, start_step=5, freeze_observers_step=12)
    fit(quiet_trainer_kwargs, [qat, flags], max_steps=20)
    for row in flags.rows:
        assert row["fake_quant"] == (row["step"] >= 5), row["step"]
        assert row["observing"] == (row["step"] < 12), row["step"]
    frozen = [row["fc1_max"] for row in flags.rows if row["step"] >= 13]
    assert all(torch.equal(frozen[0], later) for later in frozen[1:])  # no update once frozen
    early = [row["fc1_max"] for row in flags.rows if 1 <= row["step"] <= 6]
    assert not all(torch.equal(early[0], later) for later in early[1:])  # observers follow training before


def test_int8_qat_still_learns_digits(quiet_trainer_kwargs: dict[str, Any]) -> None:
    model = fit(
        quiet_trainer_kwargs,
        [QuantizationAwareTraining(weight_bits=8, activation_bits=8, start_step=10)],
        max_steps=-1,
        max_epochs=3,
    )
    trainer = pl.Trainer(**quiet_trainer_kwargs)
    (metrics,) = trainer.validate(model, datamodule=DigitsDataModule(), verbose=False)
    assert metrics["val/acc"] > 0.85  # 10 classes: chance is 0.1


def test_pruned_weights_stay_exactly_zero_after_fake_quantization(quiet_trainer_kwargs: dict[str, Any]) -> None:
    callbacks = [
        GradualPruning(0.8, start_step=0, end_step=10, update_every=5),
        QuantizationAwareTraining(weight_bits=8, start_step=0),
    ]
    model = fit(quiet_trainer_kwargs, callbacks, max_steps=15)
    layers = (model.net.conv1, model.net.conv2, model.net.fc1, model.net.fc2)
    zeros = sum(int((layer.weight == 0).sum()) for layer in layers) / sum(layer.weight.numel() for layer in layers)
    assert zeros == pytest.approx(0.8, abs=0.005)
    for layer in layers:
        pruned = layer.weight == 0
        with torch.no_grad():
            assert torch.count_nonzero(layer.quantized_weight()[pruned]) == 0


@pytest.mark.parametrize("learnable_scales", [False, True], ids=["observed", "lsq"])
def test_resume_from_the_last_batch_of_an_epoch_is_bitwise_exact(
    tmp_path: Path, quiet_trainer_kwargs: dict[str, Any], learnable_scales: bool
) -> None:
    """Also with learnable scales: the checkpoint (step 19, after start_step) carries them, and the resumed run must
    not start them again from the observers."""

    def callbacks() -> list[Callback]:
        return [QuantizationAwareTraining(weight_bits=4, activation_bits=8, start_step=10, freeze_observers_step=30,
                                          learnable_scales=learnable_scales)]  # fmt: skip

    whole, resumed = whole_and_resumed(quiet_trainer_kwargs, tmp_path, callbacks, max_steps=45)
    expected, got = whole.state_dict(), resumed.state_dict()
    assert expected.keys() == got.keys() and any("observer" in k for k in got)
    for key, tensor in expected.items():
        assert torch.equal(got[key], tensor), key


class Scales(Callback):
    """Records, before every step's forward, net.fc1's learnable weight scale and its observer's scale."""

    def __init__(self) -> None:
        self.rows: list[tuple[int, torch.Tensor, torch.Tensor]] = []

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        layer = pl_module.net.fc1
        observed = layer.weight_observer.calculate_qparams()[0]
        self.rows.append((trainer.global_step, layer.weight_scale.detach().clone(), observed))


def test_learnable_scales_start_from_the_observers_then_learn(quiet_trainer_kwargs: dict[str, Any]) -> None:
    """LSQ: scales are Parameters untouched before start_step, equal to the observed scales at start_step, then
    moved by their gradients; the int8 model converts with the learned scales and still classifies digits."""
    scales = Scales()
    qat = QuantizationAwareTraining(weight_bits=4, activation_bits=8, start_step=10, learnable_scales=True)
    model = fit(quiet_trainer_kwargs, [qat, scales], max_steps=-1, max_epochs=3)
    assert "net.fc1.weight_scale" in dict(model.named_parameters())
    before = [scale for step, scale, _ in scales.rows if step < 10]
    assert before and all(torch.equal(scale, torch.ones_like(scale)) for scale in before)
    (step, at_start, observed) = scales.rows[10]
    assert step == 10 and torch.equal(at_start, observed)
    last_learned, last_observed = scales.rows[-1][1], scales.rows[-1][2]
    assert (last_learned - last_observed).abs().max() > 1e-3 * last_observed.max()
    int8 = qat.int8_model
    torch.testing.assert_close(int8.net.fc1.weight_scale, model.net.fc1.weight_scale.detach().clamp(min=1e-7))
    (metrics,) = pl.Trainer(**quiet_trainer_kwargs).validate(int8, datamodule=DigitsDataModule(), verbose=False)
    assert metrics["val/acc"] > 0.85


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"learnable_scales": 1}, r"`learnable_scales` must be True or False; got 1"),
        ({"weight_bits": 1}, r"`weight_bits` must be an integer from 2 to 8; got 1"),
        ({"weight_bits": 16}, r"`weight_bits` must be an integer from 2 to 8; got 16"),
        ({"weight_bits": "8"}, r"`weight_bits` must be an integer from 2 to 8; got '8'"),
        ({"activation_bits": 9}, r"`activation_bits` must be an integer from 2 to 8 or None .*got 9"),
        ({"start_step": -1}, r"`start_step` must be an integer >= 0; got -1"),
        (
            {"start_step": 10, "freeze_observers_step": 5},
            r"`freeze_observers_step` must be an integer step >= `start_step`=10 or None; got 5",
        ),
        (
            {"start_step": 10, "freeze_bn_step": 3},
            r"`freeze_bn_step` must be an integer step >= `start_step`=10 or None; got 3",
        ),
        ({"include": "net.fc1"}, r"`include` must be a list of regular expressions"),
    ],
)
def test_bad_arguments_are_refused_at_construction(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        QuantizationAwareTraining(**kwargs)


def test_include_matching_nothing_is_refused_before_any_step(quiet_trainer_kwargs: dict[str, Any]) -> None:
    trainer = pl.Trainer(
        max_steps=5, callbacks=[QuantizationAwareTraining(include=["net.fc9"])], **quiet_trainer_kwargs
    )
    types = "Linear/Conv1d/Conv2d/LowRankLinear/LowRankConv2d/transformers Conv1D"
    with pytest.raises(ValueError, match=rf"`include` pattern 'net.fc9' matches no {types} module"):
        trainer.fit(ImageClassifier(image_size=8), datamodule=DigitsDataModule())
    assert trainer.global_step == 0


def test_a_model_with_no_quantizable_layer_is_refused(quiet_trainer_kwargs: dict[str, Any]) -> None:
    class NoLinear(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(10, 4)

        def training_step(self, batch: Any, idx: int) -> torch.Tensor:
            return self.embed(batch[1]).sum()

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    trainer = pl.Trainer(max_steps=1, callbacks=[QuantizationAwareTraining()], **quiet_trainer_kwargs)
    with pytest.raises(
        ValueError, match=r"No module of NoLinear is left to compress: supported types are Linear/Conv1d/Conv2d"
    ):
        trainer.fit(NoLinear(), datamodule=DigitsDataModule())


def test_validation_and_inference_never_move_the_ranges(quiet_trainer_kwargs: dict[str, Any]) -> None:
    model = fit(quiet_trainer_kwargs, [QuantizationAwareTraining(weight_bits=8, activation_bits=8)], max_steps=5)
    ranges = {k: v.clone() for k, v in model.state_dict().items() if "observer" in k}
    pl.Trainer(**quiet_trainer_kwargs).validate(model, datamodule=DigitsDataModule(), verbose=False)
    model.eval()
    with torch.no_grad():
        model(torch.randn(4, 1, 8, 8) * 100)  # far outside anything seen in training
    assert all(torch.equal(model.state_dict()[k], v) for k, v in ranges.items())


def test_batch_norm_statistics_freeze_at_freeze_bn_step(quiet_trainer_kwargs: dict[str, Any]) -> None:
    class WithBatchNorm(ImageClassifier):
        def __init__(self) -> None:
            super().__init__(image_size=8)
            self.bn = nn.BatchNorm2d(1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(self.bn(x))

    class RunningMean(Callback):
        def __init__(self) -> None:
            self.rows: list[tuple[int, bool, torch.Tensor]] = []

        def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
            self.rows.append((trainer.global_step, pl_module.bn.training, pl_module.bn.running_mean.clone()))

    pl.seed_everything(0)
    seen = RunningMean()
    qat = QuantizationAwareTraining(start_step=2, freeze_bn_step=5)
    trainer = pl.Trainer(max_steps=25, callbacks=[qat, seen], **quiet_trainer_kwargs)  # crosses an epoch (19 steps)
    trainer.fit(WithBatchNorm(), datamodule=DigitsDataModule())
    for step, training, _ in seen.rows:
        assert training == (step <= 5), step  # the batch of step s runs with the flags set before it: s - 1 >= 5
    frozen = [mean for step, _, mean in seen.rows if step >= 6]
    assert all(torch.equal(frozen[0], later) for later in frozen[1:])
