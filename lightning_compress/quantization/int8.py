"""Int8 inference layers: what a QAT layer becomes after :func:`~lightning_compress.quantization.convert_to_int8`.

Each layer stores its weight as integers (``int8`` buffer ``qweight``, values inside the trained bit width), one
float32 scale per output channel or group (``weight_scale``), the float bias, and, when activations were quantized,
the input's scale and zero point (``input_scale``, ``input_zero_point``). Forward quantizes the input with that scale
(the arithmetic fake quantization used in training) and runs oneDNN's integer kernel (see :mod:`.kernels`), so the
converted model computes what the QAT model computed in eval mode, up to float rounding, and pruned weights are
integer zeros.

A drop-in for the float layer (DESIGN principle 9): ``weight`` is the float weight the integers stand for (a
read-only property of the dense shape, in the float dtype of ``weight_scale``, on the buffers' device), so model code
that reads ``layer.weight`` or casts inputs with ``x.to(layer.weight.dtype)`` (ViT's patch embedding) keeps working;
``in_features``/``out_features`` or the conv geometry, ``bias`` and ``extra_repr`` are those of the float layer.
oneDNN's packed weight is a cache outside the module's state: ``copy.deepcopy``, pickling (``torch.save`` of the
module) and ``.to()`` leave it behind, and the next forward packs again.

Weight-only layers (``activation_bits=None``) store int8 weights but compute in float: smaller, not faster.
The constructors take only JSON-able arguments, so ``save_compressed`` can record and rebuild these layers.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lightning_compress.packing import packed_nbytes
from lightning_compress.protocol import LayerFigures, LayerStorage
from lightning_compress.quantization import kernels
from lightning_compress.quantization.fake_quant import QuantSpec, quantize

__all__ = ["Int8Conv1d", "Int8Conv2d", "Int8Linear"]


class _Int8Base(nn.Module):
    qweight: torch.Tensor
    weight_scale: torch.Tensor
    bias: torch.Tensor | None
    input_scale: torch.Tensor
    input_zero_point: torch.Tensor

    group_size: int | None = None

    def _init_buffers(self, weight_shape: tuple[int, ...], bias: bool, weight_bits: int, activation_bits: int | None):
        self.weight_spec = QuantSpec(bits=weight_bits, symmetric=True, per_channel=True, channel_axis=0)
        self.activation_spec = (
            None if activation_bits is None else QuantSpec(bits=activation_bits, symmetric=False, per_channel=False)
        )
        self.weight_bits, self.activation_bits = weight_bits, activation_bits
        self.register_buffer("qweight", torch.zeros(weight_shape, dtype=torch.int8))
        scales = weight_shape[0] if self.group_size is None else math.prod(weight_shape) // self.group_size
        self.register_buffer("weight_scale", torch.ones(scales))
        self.register_buffer("bias", torch.zeros(weight_shape[0]) if bias else None)
        if activation_bits is not None:
            self.register_buffer("input_scale", torch.tensor(1.0))
            self.register_buffer("input_zero_point", torch.tensor(0, dtype=torch.int32))
        self._packed: tuple[tuple[Any, ...], torch.Tensor] | None = None

    def _load_from_qat(self, layer: nn.Module) -> None:
        """Copy the integers and scales the QAT ``layer`` trained (its observers' ranges) into this layer."""
        scale, zero_point = layer.weight_qparams()
        with torch.no_grad():
            grouped = layer.grouped(layer.weight.detach())
            self.qweight.copy_(quantize(grouped, scale, zero_point, self.weight_spec).reshape(self.qweight.shape))
            self.weight_scale.copy_(scale)
            if self.bias is not None:
                self.bias.copy_(layer.bias.detach())
            if self.activation_spec is not None:
                input_scale, input_zero_point = layer.input_qparams()
                self.input_scale.copy_(input_scale)
                self.input_zero_point.copy_(input_zero_point)

    def float_weight(self) -> torch.Tensor:
        """The float32 weight the integers stand for (one scale per output channel, or per group)."""
        if self.group_size is None:
            return kernels.dequantized_weight(self.qweight, self.weight_scale)
        grouped = self.qweight.reshape(-1, self.group_size)
        return kernels.dequantized_weight(grouped, self.weight_scale).reshape(self.qweight.shape)

    @property
    def weight(self) -> torch.Tensor:
        """The float weight the integers stand for, as a float layer's ``weight``: the dense shape, the float dtype
        of the layer (``weight_scale``'s: float32 unless the model was cast), on the buffers' device. A new tensor at
        each read, not a Parameter: edit the integers (``qweight``) and scales to change the layer."""
        return self.float_weight().to(self.weight_scale.dtype)

    def dense_weight_shape(self) -> tuple[int, ...]:
        """The shape of the dense weight this layer stands for (read without dequantizing)."""
        return tuple(self.qweight.shape)

    def _quantized_input(self, x: torch.Tensor) -> tuple[torch.Tensor, float, int]:
        """The input's integers (rounded in float32, whatever the model's dtype), its scale and zero point."""
        scale, zero_point = self.input_scale.float(), self.input_zero_point
        return quantize(x.float(), scale, zero_point, self.activation_spec), float(scale), int(zero_point)

    def _cached_pack(self, make: Any) -> torch.Tensor:
        """oneDNN's packed weight, re-made only when a buffer it depends on changed (``load_state_dict``, edits)."""
        tensors = [self.qweight, self.weight_scale]
        if self.activation_spec is not None:
            tensors += [self.input_scale, self.input_zero_point]
        key = tuple((t.data_ptr(), t._version) for t in tensors)
        if self._packed is None or self._packed[0] != key:
            self._packed = (key, make())
        return self._packed[1]

    def __getstate__(self) -> dict[str, Any]:
        """The state ``copy.deepcopy`` and pickle copy: without oneDNN's packed weight (an opaque tensor that has no
        storage to copy); the copy packs its own at its first forward."""
        state = super().__getstate__()
        state["_packed"] = None
        return state

    def _apply(self, fn: Any, recurse: bool = True) -> _Int8Base:
        """``.to()``, ``.cuda()``, ``.half()``...: the buffers move, and the packed weight is packed again from them."""
        self._packed = None
        return super()._apply(fn, recurse)

    def storage(self) -> LayerStorage:
        """Weight and bias as parameters (dense: at fp32); bytes as ``save_compressed`` writes the buffers."""
        tensors = [self.qweight] + ([] if self.bias is None else [self.bias])
        params = sum(t.numel() for t in tensors)
        nonzeros = sum(int(torch.count_nonzero(t)) for t in tensors)
        return LayerStorage(params, nonzeros, 4 * params, sum(packed_nbytes(b) for b in self.buffers()))

    def compression_figures(self) -> LayerFigures:
        """``bits`` is the weight width; FLOPs count non-zero weights (integer arithmetic is reported via bits)."""
        shape = tuple(self.qweight.shape)
        total = self.qweight.numel()
        nonzeros = int(torch.count_nonzero(self.qweight))
        return LayerFigures(
            weight_shape=shape,
            params_dense=total,
            params_effective=nonzeros,
            bits=self.weight_bits,
            rank=None,
            flops_factor=nonzeros / total if total else 1.0,
        )

    def _bits_repr(self) -> str:
        return f"weight_bits={self.weight_bits}, activation_bits={self.activation_bits}"


class Int8Linear(_Int8Base):
    """``y = x W^T + b`` with ``W`` stored as int8 (per output channel scales) and ``x`` quantized per tensor.

    With ``group_size`` (one scale per group of consecutive input weights) the integer kernels do not apply: the
    layer stores int8 weights and computes in float.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        weight_bits: int = 8,
        activation_bits: int | None = 8,
        group_size: int | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self._init_buffers((out_features, in_features), bias, weight_bits, activation_bits)

    @classmethod
    def from_qat(cls, layer: nn.Module) -> Int8Linear:
        """The int8 layer for a trained ``QATLinear`` (its weight, bias and observed ranges)."""
        spec = layer.activation_spec
        out = cls(layer.in_features, layer.out_features, layer.bias is not None, layer.weight_spec.bits,
                  None if spec is None else spec.bits, layer.group_size)  # fmt: skip
        out._load_from_qat(layer)
        return out

    def rebuild_args(self) -> dict[str, Any]:
        """The constructor arguments (JSON-able) that rebuild this layer's empty skeleton."""
        return {"in_features": self.in_features, "out_features": self.out_features, "bias": self.bias is not None,
                "weight_bits": self.weight_bits, "activation_bits": self.activation_bits,
                "group_size": self.group_size}  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.activation_spec is None:
            return F.linear(x, self.float_weight().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        q, scale, zero_point = self._quantized_input(x)
        if self.group_size is None and kernels.onednn_available(x.device):
            packed = self._cached_pack(lambda: kernels.prepack_linear(self.qweight))
            out = kernels.linear_u8s8(q, scale, zero_point, packed, self.weight_scale, self.bias)
        else:
            out = F.linear(
                kernels.dequantized_input(q, scale, zero_point), self.float_weight(), kernels.as_float32(self.bias)
            )
        return out.to(x.dtype)

    def extra_repr(self) -> str:
        group = "" if self.group_size is None else f", group_size={self.group_size}"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            + self._bits_repr()
            + group
        )


class Int8Conv2d(_Int8Base):
    """``nn.Conv2d`` (zero padding) with an int8 weight (per output channel scales) and a per-tensor quantized input."""

    padding_mode = "zeros"  # the only one the QAT convolutions take (as nn.Conv2d's attribute)

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: list[int],
        stride: list[int],
        padding: list[int] | str,
        dilation: list[int],
        groups: int = 1,
        bias: bool = True,
        weight_bits: int = 8,
        activation_bits: int | None = 8,
    ) -> None:
        super().__init__()
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size, self.stride, self.dilation = tuple(kernel_size), tuple(stride), tuple(dilation)
        self.padding = padding if isinstance(padding, str) else tuple(padding)
        self._onednn_padding = _explicit_padding(self.padding, self.kernel_size, self.dilation)
        shape = (out_channels, in_channels // groups, *self.kernel_size)
        self._init_buffers(shape, bias, weight_bits, activation_bits)

    @classmethod
    def from_qat(cls, layer: nn.Module) -> Int8Conv2d:
        """The int8 layer for a trained ``QATConv2d`` / ``QATConv1d`` (weight, bias, geometry, observed ranges)."""
        spec = layer.activation_spec
        out = cls(layer.in_channels, layer.out_channels, list(layer.kernel_size), list(layer.stride),
                  layer.padding if isinstance(layer.padding, str) else list(layer.padding), list(layer.dilation),
                  layer.groups, layer.bias is not None, layer.weight_spec.bits,
                  None if spec is None else spec.bits)  # fmt: skip
        out._load_from_qat(layer)
        return out

    def rebuild_args(self) -> dict[str, Any]:
        """The constructor arguments (JSON-able) that rebuild this layer's empty skeleton."""
        padding = self.padding if isinstance(self.padding, str) else list(self.padding)
        return {"in_channels": self.in_channels, "out_channels": self.out_channels,
                "kernel_size": list(self.kernel_size), "stride": list(self.stride), "padding": padding,
                "dilation": list(self.dilation), "groups": self.groups, "bias": self.bias is not None,
                "weight_bits": self.weight_bits, "activation_bits": self.activation_bits}  # fmt: skip

    def _float_conv(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.activation_spec is None:
            weight = kernels.dequantized_weight(self.qweight, self.weight_scale).to(x.dtype)
            return self._float_conv(x, weight, None if self.bias is None else self.bias.to(x.dtype))
        q, scale, zero_point = self._quantized_input(x)
        padding = self._onednn_padding
        batched = x.dim() == len(self.kernel_size) + 2
        if padding is None or not batched or not kernels.onednn_available(x.device):
            weight = kernels.dequantized_weight(self.qweight, self.weight_scale)
            inputs = kernels.dequantized_input(q, scale, zero_point)
            return self._float_conv(inputs, weight, kernels.as_float32(self.bias)).to(x.dtype)
        # Conv1d runs as a Conv2d of height 1: (N, C, L) -> (N, C, 1, L), geometry (1, s), (0, p), (1, d).
        flat = len(self.kernel_size) == 1
        weight = self.qweight.unsqueeze(2) if flat else self.qweight
        stride, padding, dilation = ((1, *self.stride), (0, *padding), (1, *self.dilation)) if flat else (
            self.stride, padding, self.dilation)  # fmt: skip
        packed = self._cached_pack(
            lambda: kernels.prepack_conv2d(
                weight, self.weight_scale, scale, zero_point, stride, padding, dilation, self.groups
            )  # fmt: skip
        )
        q = (q.unsqueeze(2) if flat else q).contiguous()
        out = kernels.conv2d_u8s8(q, scale, zero_point, packed, self.weight_scale, self.bias, stride, padding,
                                  dilation, self.groups)  # fmt: skip
        return (out.squeeze(2) if flat else out).to(x.dtype)

    def extra_repr(self) -> str:
        """The float convolution's own repr (defaults left out, as torch writes it), then the bit widths."""
        parts = [f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}"]
        if self.padding != (0,) * len(self.padding):
            parts.append(f"padding={self.padding}")
        if self.dilation != (1,) * len(self.dilation):
            parts.append(f"dilation={self.dilation}")
        if self.groups != 1:
            parts.append(f"groups={self.groups}")
        if self.bias is None:
            parts.append("bias=False")
        return ", ".join([*parts, self._bits_repr()])


class Int8Conv1d(Int8Conv2d):
    """``nn.Conv1d`` (zero padding) with an int8 weight; runs oneDNN's integer convolution at height 1."""

    def _float_conv(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.conv1d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)


def _explicit_padding(padding: tuple[int, ...] | str, kernel: tuple[int, ...], dilation: tuple[int, ...]):
    """Padding as ints for oneDNN, or None where it has no symmetric equivalent (``'same'`` with even kernels)."""
    if padding == "valid":
        return (0, 0)
    if padding == "same":
        total = [d * (k - 1) for k, d in zip(kernel, dilation, strict=True)]
        return None if any(t % 2 for t in total) else tuple(t // 2 for t in total)
    return tuple(padding)
