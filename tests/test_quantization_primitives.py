"""Quantization primitives: QuantSpec, fake quantization (STE), quantize/dequantize, observers, QAT layers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_compress.protocol import DescribesCompression, LayerFigures, describe
from lightning_compress.quantization import (
    MinMaxObserver,
    MovingAverageObserver,
    QATConv2d,
    QATLinear,
    QuantSpec,
    dequantize,
    fake_quantize,
    qrange,
    quantize,
    scale_zero_point,
)

INT8_WEIGHT = QuantSpec(bits=8, symmetric=True, per_channel=True, channel_axis=0)
INT8_ACT = QuantSpec(bits=8, symmetric=False, per_channel=False)


def reference_fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int):
    """Written out by hand: round half to even of x/scale, shift, clamp, shift back, rescale."""
    q = torch.round(x * (1.0 / scale)) + zero_point
    q = torch.clamp(q, qmin, qmax)
    return (q - zero_point) * scale


# --- QuantSpec -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [1, 9, 16, "8", 8.0, True])
def test_spec_rejects_bad_bits(bits):
    with pytest.raises(ValueError, match=r"`bits` must be an int from 2 to 8, got"):
        QuantSpec(bits=bits)


def test_spec_rejects_bad_flags_and_names_the_field():
    with pytest.raises(ValueError, match="`symmetric` must be True or False, got 'yes'"):
        QuantSpec(symmetric="yes")
    with pytest.raises(ValueError, match="`per_channel` must be True or False, got 1"):
        QuantSpec(per_channel=1)
    with pytest.raises(ValueError, match="`channel_axis` must be an int"):
        QuantSpec(channel_axis=0.5)


def test_spec_is_frozen_and_ranges():
    spec = QuantSpec(bits=8)
    with pytest.raises(AttributeError):
        spec.bits = 4  # type: ignore[misc]
    assert qrange(QuantSpec(bits=8, symmetric=True)) == (-127, 127)
    assert qrange(QuantSpec(bits=4, symmetric=True)) == (-7, 7)
    assert qrange(QuantSpec(bits=8, symmetric=False)) == (0, 255)
    assert qrange(QuantSpec(bits=2, symmetric=False)) == (0, 3)


# --- scale and zero point ------------------------------------------------------------------------------------------


def test_scale_zero_point_symmetric_and_asymmetric():
    scale, zp = scale_zero_point(torch.tensor([-2.0, -0.5]), torch.tensor([1.0, 3.0]), INT8_WEIGHT)
    torch.testing.assert_close(scale, torch.tensor([2.0 / 127, 3.0 / 127]))
    assert zp.dtype == torch.int32 and zp.tolist() == [0, 0]

    scale, zp = scale_zero_point(-1.0, 3.0, INT8_ACT)
    torch.testing.assert_close(scale, torch.tensor(4.0 / 255))
    assert int(zp) == round(1.0 / (4.0 / 255))
    # The range always includes zero: all-positive data keeps zero_point 0, all-negative data gets qmax.
    scale, zp = scale_zero_point(2.0, 5.0, INT8_ACT)
    torch.testing.assert_close(scale, torch.tensor(5.0 / 255))
    assert int(zp) == 0
    _, zp = scale_zero_point(-5.0, -2.0, INT8_ACT)
    assert int(zp) == 255


def test_zero_range_gets_a_positive_scale():
    for spec in (INT8_WEIGHT, INT8_ACT):
        scale, zp = scale_zero_point(torch.zeros(3), torch.zeros(3), spec)
        assert bool((scale > 0).all()) and zp.tolist() == [0, 0, 0]
        spec_pt = QuantSpec(bits=8, symmetric=spec.symmetric)
        out = fake_quantize(torch.zeros(4), *scale_zero_point(0.0, 0.0, spec_pt), spec_pt)
        assert torch.equal(out, torch.zeros(4))


# --- fake quantization ---------------------------------------------------------------------------------------------


def test_int8_per_channel_matches_hand_written_reference():
    torch.manual_seed(0)
    w = torch.randn(32, 64) * torch.linspace(0.1, 3.0, 32)[:, None]
    scale, zp = scale_zero_point(w.amin(1), w.amax(1), INT8_WEIGHT)
    out = fake_quantize(w, scale, zp, INT8_WEIGHT)
    expected = reference_fake_quantize(w, scale[:, None], zp[:, None].float(), -127, 127)
    assert torch.equal(out, expected)
    # Every weight is inside the range: the error is at most half a step of its channel.
    assert bool(((out - w).abs() <= scale[:, None] / 2 * (1 + 1e-5)).all())
    # The largest magnitude of each channel lands on qmax/qmin exactly.
    q = quantize(w, scale, zp, INT8_WEIGHT)
    assert q.dtype == torch.int8
    largest = w.abs().argmax(dim=1)
    edge = q[torch.arange(32), largest]
    assert edge.abs().tolist() == [127] * 32
    assert torch.equal(torch.sign(edge.float()), torch.sign(w[torch.arange(32), largest]))
    # Zero maps to exactly zero.
    w0 = w.clone()
    w0[:, 5] = 0.0
    assert bool((fake_quantize(w0, scale, zp, INT8_WEIGHT)[:, 5] == 0).all())


def test_rounding_is_half_to_even_and_values_are_clamped():
    spec = QuantSpec(bits=8, symmetric=True)
    scale, zp = torch.tensor(0.5), torch.tensor(0, dtype=torch.int32)
    x = torch.tensor([0.25, 0.75, 1.25, -0.25, -0.75, 100.0, -100.0])  # x/scale = 0.5, 1.5, 2.5, ..., 200, -200
    assert fake_quantize(x, scale, zp, spec).tolist() == [0.0, 1.0, 1.0, -0.0, -1.0, 63.5, -63.5]
    assert quantize(x, scale, zp, spec).tolist() == [0, 2, 2, 0, -2, 127, -127]


def test_asymmetric_zero_is_exact():
    torch.manual_seed(1)
    x = torch.rand(1000) * 5 - 1  # [-1, 4)
    scale, zp = scale_zero_point(x.min(), x.max(), INT8_ACT)
    assert float(fake_quantize(torch.tensor([0.0]), scale, zp, INT8_ACT)) == 0.0
    assert quantize(x, scale, zp, INT8_ACT).dtype == torch.uint8
    assert float((fake_quantize(x, scale, zp, INT8_ACT) - x).abs().max()) <= float(scale) / 2 * (1 + 1e-5)


@pytest.mark.parametrize("per_channel", [False, True])
def test_straight_through_gradient(per_channel):
    spec = QuantSpec(bits=8, symmetric=True, per_channel=per_channel)
    scale = torch.full((4,), 0.01) if per_channel else torch.tensor(0.01)
    zp = torch.zeros_like(scale, dtype=torch.int32)
    inside = torch.linspace(-1.2, 1.2, 12).repeat(4, 1)  # |x/scale| <= 120 < 127
    outside = torch.tensor([-5.0, -1.4, 1.4, 3.0]).repeat(4, 1)  # |x/scale| >= 140 > 127
    x = torch.cat([inside, outside], dim=1).requires_grad_(True)
    fake_quantize(x, scale, zp, spec).sum().backward()
    assert torch.equal(x.grad[:, :12], torch.ones(4, 12))
    assert torch.equal(x.grad[:, 12:], torch.zeros(4, 4))


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("per_channel", [True, False])
def test_fake_quantize_equals_dequantize_of_quantize_bitwise(bits, symmetric, per_channel):
    torch.manual_seed(bits)
    spec = QuantSpec(bits=bits, symmetric=symmetric, per_channel=per_channel, channel_axis=1)
    x = torch.randn(16, 24, 5) * 3
    if per_channel:
        lo, hi = x.transpose(0, 1).reshape(24, -1).aminmax(dim=1)
    else:
        lo, hi = x.aminmax()
    scale, zp = scale_zero_point(lo * 0.8, hi * 0.8, spec)  # 0.8: some values clamp
    q = quantize(x, scale, zp, spec)
    assert q.dtype == (torch.int8 if symmetric else torch.uint8)
    qmin, qmax = qrange(spec)
    assert int(q.min()) >= qmin and int(q.max()) <= qmax
    assert torch.equal(fake_quantize(x, scale, zp, spec), dequantize(q, scale, zp, channel_axis=1))


# --- observers -----------------------------------------------------------------------------------------------------


def test_min_max_observer_per_channel_over_batches():
    torch.manual_seed(0)
    obs = MinMaxObserver(QuantSpec(per_channel=True, channel_axis=1), channels=6)
    batches = [torch.randn(4, 6, 3) * (i + 1) for i in range(3)]
    for batch in batches:
        assert obs(batch) is batch
    everything = torch.cat(batches).transpose(0, 1).reshape(6, -1)
    assert torch.equal(obs.min_val, everything.amin(1))
    assert torch.equal(obs.max_val, everything.amax(1))
    scale, zp = obs.calculate_qparams()
    torch.testing.assert_close(scale, torch.maximum(-obs.min_val, obs.max_val) / 127)
    with pytest.raises(ValueError, match="expects 6 channels"):
        obs(torch.randn(4, 5, 3))


def test_min_max_observer_per_tensor():
    obs = MinMaxObserver(QuantSpec())
    obs(torch.tensor([1.0, 2.0]))
    obs(torch.tensor([-3.0, 0.5]))
    assert (float(obs.min_val), float(obs.max_val)) == (-3.0, 2.0)


def test_observer_constructor_checks():
    with pytest.raises(ValueError, match="`channels` must be a positive int"):
        MinMaxObserver(QuantSpec(per_channel=True))
    with pytest.raises(ValueError, match="`channels` is only for per-channel"):
        MinMaxObserver(QuantSpec(), channels=3)
    with pytest.raises(ValueError, match="`momentum` must be a float in"):
        MovingAverageObserver(INT8_ACT, momentum=0.0)


def test_moving_average_observer_formula():
    obs = MovingAverageObserver(INT8_ACT, momentum=0.1)
    unseen_scale, unseen_zp = obs.calculate_qparams()
    assert float(unseen_scale) > 0 and int(unseen_zp) == 0
    obs(torch.tensor([-1.0, 2.0]))  # first batch initialises
    assert (float(obs.min_val), float(obs.max_val)) == (-1.0, 2.0)
    obs(torch.tensor([-3.0, 4.0]))
    torch.testing.assert_close(obs.min_val, torch.tensor(-1.0 + 0.1 * (-3.0 + 1.0)))
    torch.testing.assert_close(obs.max_val, torch.tensor(2.0 + 0.1 * (4.0 - 2.0)))


@pytest.mark.parametrize("make", [lambda: MinMaxObserver(INT8_WEIGHT, 3), lambda: MovingAverageObserver(INT8_ACT)])
def test_disabled_observer_does_not_change(make):
    obs = make()
    obs(torch.randn(3, 4))
    before = {k: v.clone() for k, v in obs.state_dict().items()}
    obs.set_enabled(False)
    obs(torch.randn(3, 4) * 100)
    assert all(torch.equal(obs.state_dict()[k], v) for k, v in before.items() if k != "enabled")
    assert not bool(obs.enabled)


@pytest.mark.parametrize("make", [lambda: MinMaxObserver(INT8_WEIGHT, 3), lambda: MovingAverageObserver(INT8_ACT)])
def test_observer_state_survives_state_dict_round_trip(make):
    obs = make()
    for _ in range(3):
        obs(torch.randn(3, 4))
    obs.set_enabled(False)
    fresh = make()
    fresh.load_state_dict(obs.state_dict())
    assert set(obs.state_dict()) == {"min_val", "max_val", "enabled"}
    for key, value in obs.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value)
    assert all(torch.equal(a, b) for a, b in zip(fresh.calculate_qparams(), obs.calculate_qparams(), strict=True))


# --- QAT layers ----------------------------------------------------------------------------------------------------


def linear_pair(bias=True, activation_spec=INT8_ACT):
    torch.manual_seed(0)
    linear = nn.Linear(32, 16, bias=bias)
    return linear, QATLinear.from_linear(linear, INT8_WEIGHT, activation_spec)


def conv_pair(activation_spec=INT8_ACT, **kwargs):
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 12, 3, **kwargs)
    return conv, QATConv2d.from_conv2d(conv, INT8_WEIGHT, activation_spec)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("bias", [True, False])
def test_qat_linear_shares_parameters_both_ways(bias):
    linear, qat = linear_pair(bias=bias)
    assert qat.weight is linear.weight and qat.bias is linear.bias
    assert [p for p in qat.parameters()] == [p for p in linear.parameters()]
    back = qat.to_linear()
    assert type(back) is nn.Linear and back.weight is linear.weight and back.bias is linear.bias
    assert (back.in_features, back.out_features) == (32, 16)
    x = torch.randn(5, 32)
    assert torch.equal(back(x), linear(x))


def test_qat_conv2d_shares_parameters_both_ways():
    conv, qat = conv_pair(stride=2, padding=1, dilation=1, groups=2)
    assert qat.weight is conv.weight and qat.bias is conv.bias
    back = qat.to_conv2d()
    assert type(back) is nn.Conv2d and back.weight is conv.weight and back.bias is conv.bias
    for attr in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups"):
        assert getattr(back, attr) == getattr(conv, attr), attr
    x = torch.randn(2, 8, 9, 9)
    assert torch.equal(back(x), conv(x))


@pytest.mark.parametrize("pair", [linear_pair, conv_pair])
def test_disabled_fake_quant_is_exactly_the_original_layer(pair):
    layer, qat = pair()
    x = torch.randn(4, 32) if isinstance(layer, nn.Linear) else torch.randn(2, 8, 7, 7)
    assert not bool(qat.fake_quant_enabled)
    assert torch.equal(qat(x), layer(x))
    # ... while the observers already watched the weight and the input.
    assert torch.equal(qat.weight_observer.max_val, layer.weight.detach().flatten(1).amax(1))
    assert float(qat.input_observer.max_val) == float(x.max())


@pytest.mark.parametrize("pair", [linear_pair, conv_pair])
@pytest.mark.parametrize("activations", [True, False])
def test_enabled_fake_quant_is_close_and_gradients_flow(pair, activations):
    layer, qat = pair(activation_spec=INT8_ACT if activations else None)
    x = torch.randn(8, 32) if isinstance(layer, nn.Linear) else torch.randn(4, 8, 9, 9)
    qat(x)  # calibrate the input range
    qat.enable_fake_quant()
    out = qat(x)
    reference = layer(x)
    assert not torch.equal(out, reference)
    assert relative_error(out, reference) < 0.02
    out.square().sum().backward()
    assert layer.weight.grad is not None and float(layer.weight.grad.abs().sum()) > 0
    assert layer.bias.grad is not None and float(layer.bias.grad.abs().sum()) > 0


def test_activation_spec_must_be_per_tensor():
    with pytest.raises(ValueError, match="`activation_spec` must be None or a per-tensor QuantSpec"):
        QATLinear.from_linear(nn.Linear(2, 2), INT8_WEIGHT, QuantSpec(per_channel=True))
    with pytest.raises(TypeError, match="`from_linear` takes an nn.Linear"):
        QATLinear.from_linear(nn.Conv2d(2, 2, 1))
    with pytest.raises(ValueError, match="padding_mode='zeros'"):
        QATConv2d.from_conv2d(nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect"))


def test_training_with_fake_quant_reduces_the_loss():
    torch.manual_seed(0)
    x = torch.randn(256, 8)
    y = x @ torch.randn(8, 1) + 0.5
    qat = QATLinear.from_linear(nn.Linear(8, 1), QuantSpec(bits=4, per_channel=True), INT8_ACT)
    qat.enable_fake_quant()
    optimizer = torch.optim.SGD(qat.parameters(), lr=0.1)
    losses = []
    for _ in range(30):
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(qat(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0]


@pytest.mark.parametrize("pair", [linear_pair, conv_pair])
def test_state_dict_round_trip_restores_observers_and_flags(pair):
    layer, qat = pair()
    x = torch.randn(4, 32) if isinstance(layer, nn.Linear) else torch.randn(2, 8, 7, 7)
    qat(x)
    qat(x * 3)
    qat.enable_fake_quant()
    qat.enable_observers(False)
    state = qat.state_dict()
    assert {
        "weight",
        "bias",
        "fake_quant_enabled",
        "weight_observer.min_val",
        "weight_observer.max_val",
        "weight_observer.enabled",
        "input_observer.min_val",
        "input_observer.max_val",
        "input_observer.enabled",
    } == set(state)
    _, fresh = pair()
    fresh.load_state_dict(state)
    for key, value in state.items():
        assert torch.equal(fresh.state_dict()[key], value), key
    assert bool(fresh.fake_quant_enabled) and not bool(fresh.input_observer.enabled)
    assert torch.equal(fresh(x), qat(x))


def test_compression_figures():
    linear, qat = linear_pair()
    with torch.no_grad():
        linear.weight[:4] = 0.0  # a quarter of the rows pruned
    assert isinstance(qat, DescribesCompression)
    figures = qat.compression_figures()
    assert figures == LayerFigures(
        weight_shape=(16, 32), params_dense=512, params_effective=384, bits=8, rank=None, flops_factor=0.75
    )
    assert describe(qat) == figures
    _, conv = conv_pair()
    assert conv.compression_figures().weight_shape == (12, 8, 3, 3)
    assert QATLinear.from_linear(nn.Linear(4, 4), QuantSpec(bits=4, per_channel=True)).compression_figures().bits == 4
