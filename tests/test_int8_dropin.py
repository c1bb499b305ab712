"""Int8 layers are drop-ins for the float layers they replace (DESIGN principle 9).

What the tests pin down:
- ``weight`` is the float weight the integers stand for (dense shape, the layer's float dtype, a tensor outside the
  state dict); the integers are ``qweight``; the float layer's attributes and ``extra_repr`` are kept;
- model code that casts its input with ``x.to(layer.weight.dtype)`` (ViT's patch embedding) runs the int8 model as
  it ran the QAT model;
- an int8 model deep-copies, pickles, ``torch.save``-s and moves like any module, with the same outputs.
"""

from __future__ import annotations

import copy
import io
import pickle
from collections.abc import Callable

import pytest
import torch
from torch import nn

from lightning_compress import QuantizationAwareTraining, convert_to_int8
from lightning_compress.protocol import dense_weight_shape
from lightning_compress.quantization import Int8Conv1d, Int8Conv2d, Int8Linear


def int8_of(model: nn.Module, inputs: torch.Tensor, activation_bits: int | None = 8) -> tuple[nn.Module, nn.Module]:
    """(``model`` after QAT calibration on ``inputs``, fake quantization on, in eval mode; its int8 conversion)."""
    layers = QuantizationAwareTraining(weight_bits=8, activation_bits=activation_bits).prepare(model)
    model.train()
    with torch.no_grad():
        for batch in inputs.split(max(1, len(inputs) // 4)):
            model(batch)
    for layer in layers.values():
        layer.enable_fake_quant()
    return model.eval(), convert_to_int8(model)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected|: the issue's measure."""
    return float((actual - expected).abs().max() / expected.abs().max())


LAYERS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "linear": (lambda: nn.Linear(12, 6), (16, 5, 12)),
    "conv1d": (lambda: nn.Conv1d(4, 6, 3, padding=1, groups=2), (16, 4, 10)),
    "conv2d": (lambda: nn.Conv2d(3, 6, 3, stride=2, padding=1), (16, 3, 8, 8)),
}
INT8_TYPES = {"linear": Int8Linear, "conv1d": Int8Conv1d, "conv2d": Int8Conv2d}


def converted(kind: str, activation_bits: int | None) -> tuple[nn.Module, nn.Module, nn.Module, torch.Tensor]:
    """(the float layer, its QAT model, the int8 model, an input) for one layer ``kind``."""
    make, shape = LAYERS[kind]
    torch.manual_seed(0)
    layer = make()
    dense = copy.deepcopy(layer)
    x = torch.randn(shape)
    qat, int8 = int8_of(nn.Sequential(layer), x, activation_bits)
    assert type(int8[0]) is INT8_TYPES[kind]
    return dense, qat, int8, x


# --------------------------------------------------------------------------------------------------- weight


@pytest.mark.parametrize("kind", list(LAYERS))
def test_weight_is_the_float_weight_the_integers_stand_for_and_qweight_holds_the_integers(kind: str) -> None:
    dense, qat, int8, _ = converted(kind, 8)
    layer = int8[0]
    assert layer.qweight.dtype == torch.int8 and layer.qweight.shape == dense.weight.shape
    weight = layer.weight
    assert weight.dtype == torch.float32 and weight.shape == dense.weight.shape and weight.device == dense.weight.device
    assert not isinstance(weight, nn.Parameter)
    scale = layer.weight_scale.reshape(-1, *[1] * (dense.weight.dim() - 1))
    assert torch.equal(weight, layer.qweight.float() * scale)
    assert torch.equal(weight, layer.float_weight())
    # The quantized weight is within half a step of the trained one (it is the weight, not a stand-in).
    assert bool(((weight - dense.weight.detach()).abs() <= scale / 2 + 1e-7).all())
    assert "0.weight" not in int8.state_dict() and int8.state_dict()["0.qweight"].dtype == torch.int8
    assert dense_weight_shape(layer) == tuple(dense.weight.shape)


@pytest.mark.parametrize("kind", list(LAYERS))
def test_the_float_layers_attributes_and_repr_are_kept(kind: str) -> None:
    dense, _, int8, _ = converted(kind, 8)
    layer = int8[0]
    names = ["in_features", "out_features"] if kind == "linear" else ["in_channels", "out_channels", "kernel_size",
             "stride", "padding", "dilation", "groups", "padding_mode"]  # fmt: skip
    assert {n: getattr(layer, n) for n in names} == {n: getattr(dense, n) for n in names}
    assert torch.equal(layer.bias, dense.bias.detach())
    assert dense.extra_repr() in layer.extra_repr() and "weight_bits=8, activation_bits=8" in layer.extra_repr()


def test_weight_follows_the_models_float_dtype() -> None:
    _, _, int8, x = converted("linear", 8)
    reference = int8(x)
    for dtype in (torch.float64, torch.bfloat16):
        cast = copy.deepcopy(int8).to(dtype)
        assert cast[0].weight.dtype == dtype and cast[0].qweight.dtype == torch.int8
        out = cast(x.to(dtype))
        assert out.dtype == dtype
        torch.testing.assert_close(out.float(), reference, atol=2e-2 if dtype == torch.bfloat16 else 1e-6, rtol=1e-2)


class CastsToWeightDtype(nn.Module):
    """The transformers idiom: ``self.proj(x.to(self.proj.weight.dtype))`` (ViT's patch embedding), then a head."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, 16, kernel_size=4, stride=4)
        self.head = nn.Linear(16 * 4, 10)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        patches = self.proj(pixels.to(self.proj.weight.dtype)).flatten(2)
        return self.head(patches.flatten(1).to(self.head.weight.dtype))


def test_a_model_that_casts_its_input_to_the_weight_dtype_matches_its_qat_model() -> None:
    torch.manual_seed(0)
    pixels = torch.randn(32, 3, 8, 8)
    qat, int8 = int8_of(CastsToWeightDtype(), pixels)
    assert type(int8.proj) is Int8Conv2d and type(int8.head) is Int8Linear
    with torch.no_grad():
        expected, actual = qat(pixels), int8(pixels)
    assert expected.abs().max() > 0.1
    assert relative_error(actual, expected) <= 1e-2


def test_a_tiny_hugging_face_vit_converts_to_int8_and_matches_its_qat_model() -> None:
    """ViT casts the pixels to ``projection.weight.dtype``: an int8 ``weight`` made them int8 (27 % off, and every
    later layer off by 100 %+)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.ViTConfig(
        image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, num_labels=5,
    )  # fmt: skip
    vit = transformers.ViTForImageClassification(config)
    pixels = torch.randn(32, 3, 16, 16)
    qat, int8 = int8_of(vit, pixels)
    assert type(int8.vit.embeddings.patch_embeddings.projection) is Int8Conv2d
    with torch.no_grad():
        expected, actual = qat(pixel_values=pixels).logits, int8(pixel_values=pixels).logits
    assert relative_error(actual, expected) <= 1e-2
    assert (actual.argmax(-1) == expected.argmax(-1)).float().mean() >= 0.99


# -------------------------------------------------------------------------------------- copies, pickles, moves


def _deepcopy(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)


def _pickle(model: nn.Module) -> nn.Module:
    return pickle.loads(pickle.dumps(model))


def _torch_save(model: nn.Module) -> nn.Module:
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.mark.parametrize("copier", [_deepcopy, _pickle, _torch_save], ids=["deepcopy", "pickle", "torch_save"])
@pytest.mark.parametrize("activation_bits", [8, None], ids=["int8_activations", "weight_only"])
@pytest.mark.parametrize("kind", list(LAYERS))
def test_an_int8_model_copies_with_identical_outputs(
    kind: str, activation_bits: int | None, copier: Callable[[nn.Module], nn.Module]
) -> None:
    _, _, int8, x = converted(kind, activation_bits)
    with torch.no_grad():
        expected = int8(x)  # the integer kernel's packed weight now exists: a copy must leave it behind
        clone = copier(int8)
        assert torch.equal(clone(x), expected)
    assert clone[0].qweight.data_ptr() != int8[0].qweight.data_ptr()
    assert_same_state(clone, int8)


def test_a_copy_is_independent_of_the_original() -> None:
    _, _, int8, x = converted("linear", 8)
    with torch.no_grad():
        expected = int8(x)
        clone = copy.deepcopy(int8)
        int8[0].qweight.neg_()  # the original's integers change; its kernel repacks, the copy's does not see it
        assert not torch.equal(int8(x), expected)
        assert torch.equal(clone(x), expected)


@pytest.mark.parametrize("kind", list(LAYERS))
def test_moving_an_int8_model_leaves_the_packed_weight_behind(kind: str) -> None:
    _, _, int8, x = converted(kind, 8)
    with torch.no_grad():
        expected = int8(x)
        moved = int8.to("cpu").double().float()
        assert moved[0]._packed is None  # packed again from the moved buffers at the next forward
        assert torch.equal(moved(x), expected)


def assert_same_state(actual: nn.Module, expected: nn.Module) -> None:
    got, want = actual.state_dict(), expected.state_dict()
    assert list(got) == list(want)
    assert all(got[name].dtype == t.dtype and torch.equal(got[name], t) for name, t in want.items())
