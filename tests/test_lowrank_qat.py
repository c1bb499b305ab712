"""QAT of low-rank factors: the QAT factorised layers share the low-rank layer's Parameters and rank mask, compute
what it computes while observing, keep switched-off components at zero, convert to two int8 factor matmuls that
match them in eval mode, survive truncation, export and deep copies, and train under LowRankRefactoring and
QuantizationAwareTraining together."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_compress import (
    LowRankRefactoring,
    QuantizationAwareTraining,
    composition,
    load_compressed,
    save_compressed,
)
from lightning_compress._lightning import Trainer
from lightning_compress.lowrank import LowRankConv2d, LowRankLinear
from lightning_compress.models import ImageClassifier
from lightning_compress.quantization import QuantSpec, convert_to_int8
from lightning_compress.quantization.lowrank_qat import (
    Int8LowRankConv2d,
    Int8LowRankLinear,
    QATLowRankConv2d,
    QATLowRankLinear,
)
from lightning_compress.targeting import Targeting

ACTIVATIONS = QuantSpec(bits=8, symmetric=False, per_channel=False)
WEIGHTS = QuantSpec(bits=8, symmetric=True, per_channel=True, channel_axis=0)
X = torch.randn(32, 3, 6, 6, generator=torch.Generator().manual_seed(100))


class TwoLayers(nn.Module):
    """A LowRankConv2d then a LowRankLinear, factorised at full rank from random dense layers."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv, _ = LowRankConv2d.from_conv2d(nn.Conv2d(3, 8, 3, padding=1))
        self.fc, _ = LowRankLinear.from_linear(nn.Linear(8 * 6 * 6, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def quantized(model: TwoLayers, activation_spec: QuantSpec | None = ACTIVATIONS) -> TwoLayers:
    """``model`` with its low-rank layers swapped for QAT ones (what the lead's QAT swap does), in place."""
    model.conv = QATLowRankConv2d.from_lowrank(model.conv, WEIGHTS, activation_spec)
    model.fc = QATLowRankLinear.from_lowrank(model.fc, WEIGHTS, activation_spec)
    return model


def calibrated(model: TwoLayers) -> TwoLayers:
    """Observe the inputs the tests evaluate on (one training batch: the ranges cover them), then fake-quantize, in
    eval mode."""
    model.train()
    model(X)
    for layer in (model.conv, model.fc):
        layer.enable_fake_quant()
    return model.eval()


def test_the_qat_layers_share_the_factor_parameters_the_bias_and_the_rank_mask() -> None:
    model = TwoLayers()
    originals = {name: (m.first, m.second, m.bias, m.rank_mask) for name, m in model.named_children()}
    quantized(model)
    for name, (first, second, bias, mask) in originals.items():
        layer = getattr(model, name)
        assert layer.first is first and layer.second is second and layer.bias is bias and layer.rank_mask is mask
    params = {id(p) for p in model.parameters()}
    assert params == {id(t) for group in originals.values() for t in group[:3]}  # no new Parameter


def test_observing_at_full_rank_computes_exactly_what_the_low_rank_layers_compute() -> None:
    reference, model = TwoLayers(), quantized(TwoLayers())
    model.train()
    with torch.no_grad():
        assert torch.equal(model(X), reference(X))
        model.eval()
        assert torch.equal(model(X), reference(X))


def test_fake_quantized_outputs_stay_close_to_the_float_low_rank_outputs() -> None:
    reference, model = TwoLayers().eval(), calibrated(quantized(TwoLayers()))
    with torch.no_grad():
        assert 0 < relative(model(X), reference(X)) < 0.05


@pytest.mark.parametrize("activation_spec", [ACTIVATIONS, None], ids=["int8-activations", "weights-only"])
def test_the_int8_form_matches_the_qat_layer_in_eval_with_the_same_argmax(activation_spec: QuantSpec | None) -> None:
    model = calibrated(quantized(TwoLayers(), activation_spec))
    int8 = convert_to_int8(model)
    assert isinstance(int8.conv, Int8LowRankConv2d) and isinstance(int8.fc, Int8LowRankLinear)
    assert int8.conv.first.qweight.dtype == torch.int8 and int8.fc.second.qweight.dtype == torch.int8
    with torch.no_grad():
        expected, got = model(X), int8(X)
    assert relative(got, expected) < 1e-2
    assert torch.equal(got.argmax(1), expected.argmax(1))


def test_switched_off_components_quantize_to_exact_zeros_and_the_int8_form_drops_them() -> None:
    model = quantized(TwoLayers())
    keep = torch.ones(model.fc.rank, dtype=torch.bool)
    keep[3:] = False
    mask_holder = LowRankLinear(1, 1, 1)  # the callback writes the mask through the low-rank layer it holds
    mask_holder.rank_mask = model.fc.rank_mask
    mask_holder.set_rank_mask(keep)
    calibrated(model)
    assert model.fc.active_rank == 3
    first = model.fc._factor(model.fc.first, model.fc.first_observer, 0)
    second = model.fc._factor(model.fc.second, model.fc.second_observer, 1)
    assert torch.count_nonzero(first[~keep]) == 0 and torch.count_nonzero(second[:, ~keep]) == 0
    int8 = model.fc.to_int8()
    assert int8.rank == 3 and int8.first.qweight.shape[0] == 3 and int8.second.qweight.shape[1] == 3
    hidden = torch.relu(model.conv(X)).flatten(1)
    with torch.no_grad():
        assert relative(int8(hidden), model.fc(hidden)) < 1e-2


def test_a_rank_lowered_through_the_wrapped_layer_reaches_the_qat_layer() -> None:
    model = TwoLayers()
    source = model.fc
    quantized(model)
    keep = torch.zeros(source.rank, dtype=torch.bool)
    keep[:4] = True
    source.set_rank_mask(keep)  # LowRankRefactoring keeps the original object and lowers its rank
    assert model.fc.active_rank == 4
    hidden = torch.randn(5, source.in_features)
    with torch.no_grad():
        assert torch.allclose(model.fc(hidden), source(hidden), atol=1e-5)


def test_truncation_keeps_the_qat_layer_and_its_outputs() -> None:
    model = calibrated(quantized(TwoLayers()))
    keep = torch.zeros(model.conv.rank, dtype=torch.bool)
    keep[torch.tensor([0, 2, 5])] = True
    model.conv.set_rank_mask(keep)
    with torch.no_grad():
        before = model(X)
        model.conv = model.conv.truncated()
        assert isinstance(model.conv, QATLowRankConv2d) and model.conv.rank == 3
        assert torch.allclose(model(X), before, atol=1e-6)
        assert relative(convert_to_int8(model)(X), before) < 1e-2


def test_a_layer_made_dense_again_stays_quantized() -> None:
    model = calibrated(quantized(TwoLayers()))
    with torch.no_grad():
        dense = model.fc.to_dense()
        hidden = torch.relu(model.conv(X)).flatten(1)
        assert type(dense).__name__ == "QATLinear" and bool(dense.fake_quant_enabled)
        assert relative(dense.eval()(hidden), model.fc(hidden)) < 0.05


def test_the_layers_describe_themselves_as_factors_of_the_dense_weight_at_their_bit_width() -> None:
    model = calibrated(quantized(TwoLayers(), None))
    assert model.fc.dense_weight_shape() == (10, 288) and model.conv.dense_weight_shape() == (8, 3, 3, 3)
    assert model.fc.weight.shape == (10, 288) and model.fc.in_features == 288 and model.conv.kernel_size == (3, 3)
    figures = model.fc.compression_figures()
    assert (figures.bits, figures.rank) == (8, 10) and figures.params_effective == 10 * (10 + 288)
    int8 = model.fc.to_int8()
    assert model.fc.storage().bytes_compressed == sum(b.numel() * b.element_size() for b in int8.buffers())
    assert int8.compression_figures() == figures and int8.weight.shape == (10, 288)


def test_the_int8_form_deep_copies_and_reloads_without_a_skeleton_to_identical_outputs(tmp_path: Path) -> None:
    model = ImageClassifier(image_size=8)
    layers, _, _ = LowRankRefactoring(rank_ratio=0.5, end_step=10).prepare(model)
    swap = {LowRankLinear: QATLowRankLinear, LowRankConv2d: QATLowRankConv2d}
    for name, layer in layers.items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, swap[type(layer)].from_lowrank(layer, WEIGHTS, ACTIVATIONS))
    x = torch.randn(8, 1, 8, 8)
    model.train()
    model(x)
    for module in model.modules():
        if isinstance(module, (QATLowRankLinear, QATLowRankConv2d)):
            module.enable_fake_quant()
    int8 = convert_to_int8(model)
    with torch.no_grad():
        expected = int8(x)
        assert torch.equal(copy.deepcopy(int8)(x), expected)
        assert relative(expected, model.eval()(x)) < 1e-2
        save_compressed(model, tmp_path / "qat.safetensors")  # the QAT model is written as its int8 form
        loaded = load_compressed(tmp_path / "qat.safetensors")
        assert isinstance(loaded.net.fc1, Int8LowRankLinear) and torch.equal(loaded(x), expected)


def test_bad_specs_and_types_are_refused_with_what_to_do() -> None:
    layer, _ = LowRankLinear.from_linear(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="`weight_spec` must be a symmetric per-channel"):
        QATLowRankLinear.from_lowrank(layer, QuantSpec(bits=8, per_channel=False))
    with pytest.raises(ValueError, match="`activation_spec` must be None or an asymmetric per-tensor"):
        QATLowRankLinear.from_lowrank(layer, WEIGHTS, QuantSpec(bits=8))
    with pytest.raises(ValueError, match="`learnable_scales`=True is not supported"):
        QATLowRankLinear.from_lowrank(layer, learnable_scales=True)
    with pytest.raises(TypeError, match="takes a LowRankConv2d, got LowRankLinear. HINT"):
        QATLowRankConv2d.from_lowrank(layer)
    with pytest.raises(ValueError, match="never observed its first, second, input, intermediate range"):
        QATLowRankLinear.from_lowrank(layer, WEIGHTS, ACTIVATIONS).to_int8()


class FactorQAT(QuantizationAwareTraining):
    """QuantizationAwareTraining as the lead will wire it: it also targets low-rank layers, swapped by this module."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        types = (nn.Linear, nn.Conv2d, LowRankLinear, LowRankConv2d)
        self.targeting = Targeting.from_arguments(self.include, self.exclude, layer_types=types)

    def swap(self, module: nn.Module) -> nn.Module:
        factorised = {LowRankLinear: QATLowRankLinear, LowRankConv2d: QATLowRankConv2d}.get(type(module))
        if factorised is None:
            return super().swap(module)
        return factorised.from_lowrank(
            module, self.weight_spec, self.activation_spec, learnable_scales=self.learnable_scales
        )


def test_a_fit_with_low_rank_refactoring_and_qat_on_the_same_layers_exports_int8_factors(
    tmp_path: Path, quiet_trainer_kwargs: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    pair = frozenset({"LowRankRefactoring", "FactorQAT"})  # the lead's composition allows the pair (by class name)
    monkeypatch.setattr(composition, "COMPOSE_ON_ONE_LAYER", composition.COMPOSE_ON_ONE_LAYER | {pair})
    torch.manual_seed(0)
    model = ImageClassifier(image_size=8)
    data = TensorDataset(torch.randn(64, 1, 8, 8), torch.randint(0, 10, (64,)))
    lowrank = LowRankRefactoring(rank_ratio=0.5, start_step=2, end_step=6, update_every=2)
    qat = FactorQAT(activation_bits=8, start_step=3, export_path=str(tmp_path / "int8.safetensors"))
    trainer = Trainer(max_steps=10, callbacks=[qat, lowrank], **quiet_trainer_kwargs)
    trainer.fit(model, DataLoader(data, batch_size=8))
    quantized_layers = [m for m in model.modules() if isinstance(m, (QATLowRankLinear, QATLowRankConv2d))]
    assert len(quantized_layers) == 4  # truncated at fit end, still QAT layers
    assert all(layer.rank == layer.active_rank < lowrank.full_ranks[name] for name, layer in lowrank.layers.items())
    x = torch.randn(8, 1, 8, 8)
    with torch.no_grad():
        expected = model.eval()(x)
        int8 = qat.int8_model
        assert int8 is not None and relative(int8(x), expected) < 1e-2
        loaded = load_compressed(tmp_path / "int8.safetensors")
        assert isinstance(loaded.net.conv1, Int8LowRankConv2d) and torch.equal(loaded(x), int8(x))
