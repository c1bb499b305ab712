"""convert_to_int8: a QAT model becomes int8 layers that run integer kernels and compute what QAT simulated."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from lightning_compress import GradualPruning, QuantizationAwareTraining, convert_to_int8
from lightning_compress._lightning import pl
from lightning_compress.data import DigitsDataModule
from lightning_compress.models import ImageClassifier
from lightning_compress.quantization import Int8Conv1d, Int8Conv2d, Int8Linear, QATConv1d, QATConv2d, QATLinear, kernels


def calibrated(model: nn.Module, inputs: torch.Tensor, **qat: Any) -> nn.Module:
    """``model`` prepared for QAT, observed on a few training-mode batches, fake quantization on, in eval mode."""
    layers = QuantizationAwareTraining(**{"weight_bits": 8, "activation_bits": 8, **qat}).prepare(model)
    model.train()
    for batch in inputs.split(max(1, len(inputs) // 4)):
        model(batch)
    for layer in layers.values():
        layer.enable_fake_quant()
    return model.eval()


def conv_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding="valid"),
        nn.Conv2d(8, 8, 3, padding="same", groups=2),
        nn.Conv2d(8, 4, 2, padding="same"),  # even kernel: 'same' has no symmetric padding, float path
        nn.Flatten(),
        nn.Linear(4 * 3 * 3, 16),
        nn.ReLU(),
        nn.Linear(16, 5),
    )


def test_converted_model_computes_what_the_qat_model_computes_in_eval() -> None:
    x = torch.randn(64, 3, 8, 8)
    qat = calibrated(conv_net(), x)
    with torch.no_grad():
        expected = qat(x)
        int8 = convert_to_int8(qat)
        got = int8(x)
    assert [type(m) for m in int8 if isinstance(m, (Int8Linear, Int8Conv2d))] == [Int8Conv2d] * 4 + [Int8Linear] * 2
    assert expected.abs().max() > 0.1  # a real signal, not zeros
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert isinstance(qat[0], QATConv2d)  # inplace=False: the QAT model is untouched


def test_conv1d_runs_the_integer_convolution_at_height_one(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    x = torch.randn(16, 4, 20)
    net = nn.Sequential(nn.Conv1d(4, 8, 3, padding=1), nn.ReLU(), nn.Conv1d(8, 6, 5, stride=2, dilation=2, groups=2))
    qat = calibrated(net, x)
    assert isinstance(qat[0], QATConv1d) and isinstance(qat[2], QATConv1d)
    int8 = convert_to_int8(qat)
    assert isinstance(int8[0], Int8Conv1d)
    calls = []
    conv = kernels.conv2d_u8s8
    monkeypatch.setattr(kernels, "conv2d_u8s8", lambda *args: calls.append(1) or conv(*args))
    with torch.no_grad():
        torch.testing.assert_close(int8(x), qat(x), atol=1e-5, rtol=1e-5)
    assert len(calls) == (2 if kernels.onednn_available(torch.device("cpu")) else 0)  # else: computed in float


def test_linear_takes_the_token_dimension_of_a_transformer() -> None:
    torch.manual_seed(0)
    x = torch.randn(4, 7, 32)
    qat = calibrated(nn.Sequential(nn.Linear(32, 48), nn.GELU(), nn.Linear(48, 32)), x)
    with torch.no_grad():
        torch.testing.assert_close(convert_to_int8(qat)(x), qat(x), atol=1e-5, rtol=1e-5)


def test_a_hugging_face_bert_converts_and_keeps_its_outputs() -> None:
    """Linear layers inside transformers (here a tiny random BERT) are quantized, converted and agree with QAT."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=100
    )
    bert = transformers.BertModel(config)
    tokens = torch.randint(0, 100, (16, 12))
    layers = QuantizationAwareTraining(8, 8, include=[r"encoder\.layer\..*"]).prepare(bert)
    assert len(layers) == 12
    bert.train()
    for batch in tokens.split(4):
        bert(input_ids=batch)
    for layer in layers.values():
        layer.enable_fake_quant()
    bert.eval()
    with torch.no_grad():
        expected = bert(input_ids=tokens).last_hidden_state
        got = convert_to_int8(bert)(input_ids=tokens).last_hidden_state
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_the_kernel_probe_says_whether_large_dot_products_come_out_exact_on_this_cpu() -> None:
    """Random full-range integers (not the probe's own case): the probe's verdict is what they show."""
    if not kernels._onednn_built():
        pytest.skip("this torch build has no oneDNN integer kernels")
    generator = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (16, 256), dtype=torch.uint8, generator=generator)
    w = torch.randint(-128, 128, (32, 256), dtype=torch.int8, generator=generator)
    out = kernels.linear_u8s8(x, 1.0, 0, kernels.prepack_linear(w), torch.ones(32), None)
    exact = torch.equal(out.double(), x.double() @ w.double().t())
    assert kernels.integer_kernels_exact() is exact


def test_integer_kernels_run_on_cpu_and_the_float_fallback_agrees(monkeypatch: pytest.MonkeyPatch) -> None:
    """The oneDNN u8s8 kernels are what runs (counted); forcing the float path gives the same numbers."""
    if not kernels.onednn_available(torch.device("cpu")):
        pytest.skip("no exact oneDNN integer kernels on this CPU (or build): the layers compute in float")
    x = torch.randn(32, 3, 8, 8)
    int8 = convert_to_int8(calibrated(conv_net(), x))
    calls = {"linear": 0, "conv": 0}
    linear, conv = kernels.linear_u8s8, kernels.conv2d_u8s8

    def count_linear(*args: Any) -> torch.Tensor:
        calls["linear"] += 1
        return linear(*args)

    def count_conv(*args: Any) -> torch.Tensor:
        calls["conv"] += 1
        return conv(*args)

    monkeypatch.setattr(kernels, "linear_u8s8", count_linear)
    monkeypatch.setattr(kernels, "conv2d_u8s8", count_conv)
    with torch.no_grad():
        integer = int8(x)
    assert calls == {"linear": 2, "conv": 3}  # the even-kernel 'same' conv is the one float layer
    monkeypatch.setattr(kernels, "onednn_available", lambda device: False)
    with torch.no_grad():
        fallback = int8(x)
    torch.testing.assert_close(integer, fallback, atol=1e-5, rtol=1e-5)


def test_weights_are_integers_in_the_trained_bit_width_and_pruned_zeros_stay_zero() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    with torch.no_grad():
        model[0].weight[:, ::3] = 0.0
    x = torch.randn(32, 64)
    int8 = convert_to_int8(calibrated(model, x, weight_bits=4))
    weight = int8[0].qweight
    assert weight.dtype == torch.int8
    assert int(weight.abs().max()) == 7  # 4-bit symmetric: -7..7, and the largest weight of a row maps to 7
    zero = model[0].weight == 0
    assert zero.sum() > 1000
    assert torch.equal(weight == 0, zero | (weight == 0))  # every pruned weight is an integer zero
    assert not bool(weight[~zero].eq(0).all())


def test_grouped_weights_get_a_scale_per_group_and_fit_4_bits_closer() -> None:
    """``weight_group_size``: one scale per group of consecutive input weights; at 4 bits the grouped weights are
    nearer the float ones than per-channel ones, and the int8 layer reproduces the grouped QAT layer."""
    torch.manual_seed(0)
    x = torch.randn(32, 64)
    errors = {}
    for group in (None, 16):
        model = nn.Sequential(nn.Linear(64, 32))
        with torch.no_grad():
            model[0].weight[:, :8] *= 20  # a few large weights per row: one scale per row wastes the 4 bits
        original = model[0].weight.detach().clone()
        qat = calibrated(model, x, weight_bits=4, weight_group_size=group)
        assert qat[0].weight_observer.min_val.numel() == (32 if group is None else 32 * 64 // 16)
        int8 = convert_to_int8(qat)
        assert int8[0].weight_scale.numel() == qat[0].weight_observer.min_val.numel()
        with torch.no_grad():
            torch.testing.assert_close(int8(x), qat(x), atol=1e-5, rtol=1e-5)
        errors[group] = float((int8[0].float_weight() - original).pow(2).mean())
    assert errors[16] < 0.5 * errors[None]


def test_a_group_size_that_does_not_divide_a_layer_is_refused_naming_the_layer() -> None:
    model = nn.Sequential(nn.Linear(64, 8), nn.Linear(8, 6))
    with pytest.raises(ValueError, match=r"layer '1'.*`group_size`=16 does not divide the layer's 8 input features"):
        QuantizationAwareTraining(weight_bits=4, weight_group_size=16).prepare(model)


def test_weight_only_models_keep_float_activations() -> None:
    torch.manual_seed(0)
    x = torch.randn(16, 32)
    qat = calibrated(nn.Sequential(nn.Linear(32, 8)), x, activation_bits=None)
    int8 = convert_to_int8(qat)
    assert not hasattr(int8[0], "input_scale")
    with torch.no_grad():
        torch.testing.assert_close(int8(x), qat(x), atol=1e-5, rtol=1e-5)


def test_a_new_state_dict_repacks_the_kernel_weights() -> None:
    """The packed weight is a cache: loading other integers must change the outputs."""
    x = torch.randn(16, 32)
    first = convert_to_int8(calibrated(nn.Sequential(nn.Linear(32, 8)), x))
    second = convert_to_int8(calibrated(nn.Sequential(nn.Linear(32, 8)), x))
    with torch.no_grad():
        before = first(x)
        first.load_state_dict(second.state_dict())
        torch.testing.assert_close(first(x), second(x))
    assert not torch.allclose(before, second(x))


def test_loading_a_state_dict_switches_fake_quantization_as_saved() -> None:
    """Forward branches on a host-side copy of the flag buffer: a loaded state dict must move it too."""
    x = torch.randn(8, 32)
    quantizing = calibrated(nn.Sequential(nn.Linear(32, 8)), x)
    fresh = nn.Sequential(nn.Linear(32, 8))
    QuantizationAwareTraining(8, 8).prepare(fresh)
    fresh.eval()
    fresh.load_state_dict(quantizing.state_dict())
    with torch.no_grad():
        assert torch.equal(fresh(x), quantizing(x))
        assert not torch.equal(fresh(x), nn.functional.linear(x, fresh[0].weight, fresh[0].bias))


def test_inplace_conversion_replaces_the_layers_of_the_model_itself() -> None:
    x = torch.randn(8, 32)
    qat = calibrated(nn.Sequential(nn.Linear(32, 8)), x)
    assert convert_to_int8(qat, inplace=True) is qat and isinstance(qat[0], Int8Linear)


def test_a_model_without_qat_layers_is_refused() -> None:
    with pytest.raises(ValueError, match=r"has no QAT layer to convert.*QuantizationAwareTraining"):
        convert_to_int8(nn.Sequential(nn.Linear(4, 4)))


def test_a_layer_that_never_observed_its_input_is_refused() -> None:
    model = nn.Sequential(nn.Linear(4, 4))
    QuantizationAwareTraining(weight_bits=8, activation_bits=8).prepare(model)
    with pytest.raises(ValueError, match=r"layer '0' has never observed its weight range"):
        convert_to_int8(model)


# ------------------------------------------------------------------------------------------- through the Trainer


def test_fit_end_keeps_an_int8_copy_that_agrees_with_the_trained_model(
    quiet_trainer_kwargs: dict[str, Any], tmp_path: Path
) -> None:
    """QAT and pruning in one run: the int8 model at fit end predicts like the QAT model, pruned weights are integer
    zeros, the trained model stays a QAT model (its Trainer is not copied), and ``export_path`` is written."""
    pl.seed_everything(0)
    model = ImageClassifier(image_size=8)
    pruning = GradualPruning(target_sparsity=0.8, start_step=0, end_step=20, update_every=5)
    qat = QuantizationAwareTraining(8, 8, start_step=5, freeze_observers_step=25, export_path=str(tmp_path / "q.lc"))
    data = DigitsDataModule()
    pl.Trainer(max_steps=30, callbacks=[pruning, qat], **quiet_trainer_kwargs).fit(model, datamodule=data)
    int8 = qat.int8_model
    assert isinstance(int8.net.fc1, Int8Linear) and isinstance(model.net.fc1, QATLinear)
    assert int8.__dict__.get("_trainer") is None and model.trainer is not None
    assert (tmp_path / "q.lc").stat().st_size > 0
    float_zero = model.net.fc1.weight.detach() == 0
    assert float_zero.float().mean() > 0.75
    assert bool((int8.net.fc1.qweight[float_zero] == 0).all())
    images = torch.cat([batch[0] for batch in data.val_dataloader()])
    with torch.no_grad():
        model.eval()
        agree = (int8(images).argmax(1) == model(images).argmax(1)).float().mean()
    assert agree > 0.99


def test_an_existing_export_path_is_refused_before_training_and_left_as_it_was(
    quiet_trainer_kwargs: dict[str, Any], tmp_path: Path
) -> None:
    target = tmp_path / "model.lc"
    target.write_bytes(b"an earlier export")
    model = ImageClassifier(image_size=8)
    qat = QuantizationAwareTraining(8, 8, export_path=str(target))
    with pytest.raises(FileExistsError, match=r"`export_path` .*model\.lc' already exists"):
        pl.Trainer(max_steps=2, callbacks=[qat], **quiet_trainer_kwargs).fit(model, datamodule=DigitsDataModule())
    assert target.read_bytes() == b"an earlier export"
    assert type(model.net.fc1) is nn.Linear  # refused before the model was touched


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"convert_at_fit_end": "yes"}, r"`convert_at_fit_end` must be True or False; got 'yes'"),
        ({"export_path": ""}, r"`export_path` must be None or a file path; got ''"),
        ({"export_path": "m.lc", "convert_at_fit_end": False}, r"`export_path` needs `convert_at_fit_end=True`"),
        ({"weight_group_size": 0}, r"`weight_group_size` must be an integer >= 1 or None .*; got 0"),
    ],
)
def test_bad_conversion_arguments_are_refused_at_construction(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        QuantizationAwareTraining(8, 8, **kwargs)


class LoggedQATLinear(QATLinear):
    """A user's subclass of a QAT layer: the same arithmetic, plus a count of its forward calls."""

    calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        type(self).calls += 1
        return super().forward(x)


class LoggedQAT(QuantizationAwareTraining):
    def swap(self, module: nn.Module) -> QATLinear:
        return LoggedQATLinear.from_linear(module, self.weight_spec, self.activation_spec)


def test_a_users_subclass_of_a_qat_layer_converts_to_int8() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    x = torch.randn(64, 16)
    layers = LoggedQAT(weight_bits=8, activation_bits=8).prepare(model)
    assert {type(layer) for layer in layers.values()} == {LoggedQATLinear}
    model(x)  # observe
    for layer in layers.values():
        layer.enable_fake_quant()
    with torch.no_grad():
        expected = model.eval()(x)
        int8 = convert_to_int8(model)
        got = int8(x)
    assert [type(int8[0]), type(int8[2])] == [Int8Linear, Int8Linear]
    assert LoggedQATLinear.calls > 0 and expected.abs().max() > 0.1
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


class HalfOutputQATLinear(QATLinear):
    """A subclass whose forward differs from its base's overrides ``to_int8`` to say what it converts to."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * super().forward(x)

    def to_int8(self) -> nn.Module:
        return nn.Sequential(super().to_int8(), Halve())


class Halve(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * x


def test_a_subclass_that_overrides_to_int8_converts_to_what_it_says() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(16, 8)
    layer = HalfOutputQATLinear.from_linear(linear, activation_spec=QuantizationAwareTraining(8, 8).activation_spec)
    x = torch.randn(32, 16)
    layer(x)
    layer.enable_fake_quant()
    model = nn.Sequential(layer)
    with torch.no_grad():
        expected = model.eval()(x)
        got = convert_to_int8(model)(x)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
