"""Integer kernels for the int8 layers: oneDNN's u8s8 Linear and Conv2d with float32 output, on CPU.

Which kernels, and why: ``torch.ops.onednn.qlinear_pointwise`` / ``qconv2d_pointwise`` take plain ``uint8`` inputs,
``int8`` weights and float scales (no quantized tensor types, which torch 2.13 deprecates), accumulate in int32 and
return float32 with the bias added (scales and bias go in as float32, also from a model cast to another float dtype).
They are the kernels torchao's x86 PT2E lowering targets, and they compute exactly what fake quantization simulated:
``(q_x - z_x) * s_x`` times ``q_w * s_w``, summed in integers. The deprecated ``torch.ao.quantization`` workflow is
not used. Everything version-specific about these ops is in this file.

Where oneDNN cannot run (another device, a build without it, a padding it does not take), the layers compute the
same arithmetic in float from the integer values (:func:`dequantized_weight`, :func:`dequantized_input`): the same
results up to float rounding, without the speed-up. So they do on a CPU whose oneDNN kernels are not exact: without
VNNI (AVX512-VNNI, AVX-VNNI, AMX), on AVX2 alone, oneDNN sums pairs of u8 x s8 products in int16 with saturation
(``vpmaddubsw``) and gets large dot products wrong (measured on an AVX2-only AMD EPYC: 1,024,096 off in 2,072,640).
:func:`integer_kernels_exact` probes this once per process.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Sequence
from typing import Any

import torch


def onednn_available(device: torch.device) -> bool:
    """Whether the oneDNN integer kernels can run on ``device`` in this torch build, and compute exactly here."""
    return device.type == "cpu" and _onednn_built() and integer_kernels_exact()


def _onednn_built() -> bool:
    return (
        torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.onednn, "qlinear_pointwise")
        and hasattr(torch.ops.onednn, "qconv2d_pointwise")
    )


@functools.cache
def integer_kernels_exact() -> bool:
    """Whether oneDNN's u8s8 Linear and Conv2d give exact int32 sums on this CPU: the largest products (255 x 127)
    through both, checked to the integer (the sums stay below 2**24, exact in float32). Probed once per process;
    warns once when they are not, and the int8 layers then compute in float from the integer values."""
    if not _onednn_built():
        return False
    try:
        x, w, ones = (
            torch.full((2, 64), 255, dtype=torch.uint8),
            torch.full((4, 64), 127, dtype=torch.int8),
            torch.ones(4),
        )
        linear = _linear_u8s8(x, 1.0, 0, prepack_linear(w), ones, None)  # the ops themselves: never a wrapper
        x4, w4 = torch.full((1, 8, 3, 3), 255, dtype=torch.uint8), torch.full((4, 8, 3, 3), 127, dtype=torch.int8)
        packed = prepack_conv2d(w4, ones, 1.0, 0, (1, 1), (0, 0), (1, 1), 1)
        conv = _conv2d_u8s8(x4, 1.0, 0, packed, ones, None, (1, 1), (0, 0), (1, 1), 1)
    except RuntimeError:
        return False
    exact = bool((linear == 255 * 127 * 64).all() and (conv == 255 * 127 * 72).all())
    if not exact:
        warnings.warn(
            "oneDNN's int8 kernels are not exact on this CPU (no VNNI: AVX2 sums pairs of u8 x s8 products in int16"
            " with saturation); the int8 layers compute in float32 from their integer values instead: the same"
            " results, without the integer speed-up.",
            stacklevel=2,
        )
    return exact


def prepack_linear(weight: torch.Tensor) -> torch.Tensor:
    """oneDNN's packed form of an ``int8`` weight of shape ``[out, in]`` (opaque; not saved)."""
    return torch.ops.onednn.qlinear_prepack(weight, None)


def linear_u8s8(
    x: torch.Tensor,
    x_scale: float,
    x_zero_point: int,
    packed: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """``uint8`` input ``[..., in]`` times the packed ``int8`` weight, per-channel scales, float32 output."""
    zero_points = torch.zeros(weight_scale.numel(), dtype=torch.int64)
    return torch.ops.onednn.qlinear_pointwise(
        x, x_scale, x_zero_point, packed, weight_scale.float(), zero_points, as_float32(bias), 1.0, 0, torch.float32,
        "none", [], "",
    )  # fmt: skip


def prepack_conv2d(
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    x_scale: float,
    x_zero_point: int,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
) -> torch.Tensor:
    """oneDNN's packed form of an ``int8`` convolution weight ``[out, in/groups, kh, kw]`` (opaque; not saved)."""
    return torch.ops.onednn.qconv_prepack(
        weight, weight_scale.float(), x_scale, x_zero_point, list(stride), list(padding), list(dilation), groups, None
    )


def conv2d_u8s8(
    x: torch.Tensor,
    x_scale: float,
    x_zero_point: int,
    packed: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
) -> torch.Tensor:
    """``uint8`` NCHW input convolved with the packed ``int8`` weight (zero padding means the real value 0)."""
    zero_points = torch.zeros(weight_scale.numel(), dtype=torch.int64)
    return torch.ops.onednn.qconv2d_pointwise(
        x, x_scale, x_zero_point, packed, weight_scale.float(), zero_points, as_float32(bias),
        list(stride), list(padding), list(dilation), groups, 1.0, 0, torch.float32, "none", [], "",
    )  # fmt: skip


_linear_u8s8, _conv2d_u8s8 = linear_u8s8, conv2d_u8s8  # what the probe calls, whatever wraps the public names


def as_float32(tensor: torch.Tensor | None) -> torch.Tensor | None:
    """``tensor`` in float32 (None stays None): what the kernels and the float fallback take for scales and bias."""
    return None if tensor is None else tensor.float()


def dequantized_weight(weight: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
    """The float32 weight the integers stand for: ``q * scale`` with one scale per output channel (dimension 0)."""
    return weight.float() * weight_scale.float().reshape(-1, *([1] * (weight.dim() - 1)))  # also in a cast model


def dequantized_input(x: torch.Tensor, x_scale: float, x_zero_point: int) -> torch.Tensor:
    """The float32 input the ``uint8`` values stand for: ``(q - zero_point) * scale``."""
    return (x.float() - x_zero_point) * x_scale


def integer_exact(
    compute: Any,
    x_codes: torch.Tensor,
    x_scale: torch.Tensor,
    x_zero_point: torch.Tensor,
    weight_codes: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    channel_dim: int,
) -> torch.Tensor:
    """What the integer kernels compute, in float arithmetic that is exact: ``acc = sum((q_x - z_x) * q_w)`` summed
    in float64 (exact for any layer width these bit widths allow), then ``(acc * s_x) * s_w[c] + b`` in float32, in
    the kernels' order. ``compute(inputs, weight)`` is the layer's linear map without bias; ``channel_dim`` the output
    dimension the per-channel ``weight_scale`` runs along (-1 for Linear, 1 for a convolution)."""
    acc = compute(x_codes.double() - x_zero_point.double(), weight_codes.double()).float()
    shape = [1] * acc.dim()
    shape[channel_dim] = -1
    out = (acc * x_scale.float()) * weight_scale.float().reshape(shape)
    return out if bias is None else out + bias.float().reshape(shape)
