"""QAT layers: Linear, Conv1d and Conv2d that observe and fake-quantize their weight (and optionally their input);
transformers' Conv1D is in ``conv1d.py``.

``from_linear`` / ``from_conv2d`` / ``from_conv1d`` share the original ``weight`` and ``bias`` Parameters (the same
objects), and ``to_linear`` / ``to_conv2d`` / ``to_conv1d`` hand them back: optimizers and strategies see no new ones.
In eval mode they compute as their int8 form does (``exact.py``). Weights are observed per output channel
(axis 0), inputs per tensor. Until ``fake_quant_enabled`` is set the layer only observes and computes exactly what the
original layer computes. The flag is a bool buffer saved with the observers' statistics, with a host-side copy that
forward branches on (no device sync; loading a state dict refreshes it). With learnable scales forward always
computes the fake-quantized values and picks through ``torch.where``, so the scales take part in every backward.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from lightning_compress.distributed import full_shape, gathered
from lightning_compress.packing import packed_nbytes
from lightning_compress.protocol import LayerFigures, LayerStorage
from lightning_compress.quantization.exact import IntegerExactEval
from lightning_compress.quantization.fake_quant import (
    EPS,
    QuantSpec,
    fake_quantize,
    learnable_fake_quantize,
    qrange,
    quantize,
)
from lightning_compress.quantization.int8 import Int8Conv1d, Int8Conv2d, Int8Linear
from lightning_compress.quantization.observers import MinMaxObserver, MovingAverageObserver

_OWN_BIAS = object()  # _conv's default: the layer's own bias
DEFAULT_WEIGHT_SPEC = QuantSpec(bits=8, symmetric=True, per_channel=True, channel_axis=0)


class _QATBase(IntegerExactEval, nn.Module):
    """Observers, the fake-quant flag and the self-description shared by the QAT layers."""

    weight: nn.Parameter
    bias: nn.Parameter | None
    fake_quant_enabled: torch.Tensor
    int8_class: ClassVar[type[nn.Module]]
    """The int8 layer this one converts to (its ``from_qat``); a subclass inherits it."""
    _transposed_weight: ClassVar[bool] = False
    """``weight`` is stored ``(in, out)`` (transformers' Conv1D): observed, and quantized, as its ``(out, in)`` view."""

    def to_int8(self) -> nn.Module:
        """The int8 inference layer computing what this layer computes in eval mode (what ``convert_to_int8``
        puts in its place). Override in a subclass whose forward differs from its base's."""
        return self.int8_class.from_qat(self).to(self.weight.device)

    def export_form(self) -> nn.Module:
        """What ``save_compressed`` writes for this layer: its int8 layer (:meth:`to_int8`) once it fake-quantizes,
        as :meth:`storage` counts it, else this layer (float weights and observer state). Needs the full weight
        (under ZeRO-3 the exporter gathers it)."""
        return self.to_int8() if bool(self.fake_quant_enabled) else self

    def _init_quantization(
        self,
        weight: nn.Parameter,
        bias: nn.Parameter | None,
        weight_spec: QuantSpec,
        activation_spec: QuantSpec | None,
        group_size: int | None = None,
        learnable_scales: bool = False,
    ) -> None:
        if not isinstance(weight_spec, QuantSpec):
            raise TypeError(f"`weight_spec` must be a QuantSpec, got {type(weight_spec).__name__}.")
        if activation_spec is not None and (not isinstance(activation_spec, QuantSpec) or activation_spec.per_channel):
            raise ValueError(
                f"`activation_spec` must be None or a per-tensor QuantSpec, got {activation_spec!r}."
                " HINT: QuantSpec(bits=8, symmetric=False, per_channel=False)."
            )
        self.weight = weight
        self.bias = bias
        self.weight_spec = weight_spec
        self.activation_spec = activation_spec
        shape = full_shape(weight)
        shape = torch.Size(shape[::-1]) if self._transposed_weight else shape  # as grouped() views it
        channels = shape[weight_spec.channel_axis] if weight_spec.per_channel else None
        if group_size is not None:
            check_group_size(group_size, shape, weight_spec)
            channels = shape.numel() // group_size
        self.group_size = group_size
        self.weight_observer = MinMaxObserver(weight_spec, channels)
        self.input_observer = MovingAverageObserver(activation_spec) if activation_spec is not None else None
        self.register_buffer("fake_quant_enabled", torch.tensor(False))
        self._fake_quant_on = False  # a host-side copy of the flag: branching on it costs no device sync
        self.register_load_state_dict_post_hook(_sync_flag_copy)
        self.learnable_scales = bool(learnable_scales)
        if self.learnable_scales:  # LSQ: the scales are Parameters, set from the observers when quantization starts
            self.weight_scale = nn.Parameter(torch.ones(channels or 1))
            self.register_buffer("scales_initialized", torch.tensor(False))
            if activation_spec is not None:
                self.input_scale = nn.Parameter(torch.ones(1))
                self.register_buffer("input_zero_point", torch.zeros(1))

    def enable_fake_quant(self, enabled: bool = True) -> None:
        """Quantize in forward (True) or only observe (False)."""
        self.fake_quant_enabled.fill_(bool(enabled))
        self._fake_quant_on = bool(enabled)

    def _skips_fake_quant(self) -> bool:
        """Before quantization starts, forward skips the fake-quantization arithmetic, except with learnable scales
        (they must take part in every backward, or DDP would find unused parameters)."""
        return not self._fake_quant_on and not self.learnable_scales

    def enable_observers(self, enabled: bool = True) -> None:
        """Keep updating (True) or freeze (False) the weight and input ranges."""
        for observer in (self.weight_observer, self.input_observer):
            if observer is not None:
                observer.set_enabled(enabled)

    def grouped(self, weight: torch.Tensor) -> torch.Tensor:
        """The weight as its observer sees it: ``[out, in]`` (a stored ``(in, out)`` weight transposed), or
        ``[out * in / group_size, group_size]`` when grouped (each row one group of consecutive input weights, with
        its own scale)."""
        view = weight.t() if self._transposed_weight else weight
        return view if self.group_size is None else view.reshape(-1, self.group_size)

    def ungrouped(self, view: torch.Tensor) -> torch.Tensor:
        """A tensor shaped as :meth:`grouped` returns it, back in the stored layout of ``weight``."""
        if self._transposed_weight:
            return view.reshape(self.weight.shape[::-1]).t()
        return view.reshape(self.weight.shape)

    def weight_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scale, zero_point)`` of the weight: the learned scales (LSQ) or the weight observer's."""
        if self.learnable_scales:
            scale = self.weight_scale.detach().clamp(min=EPS)
            return scale, torch.zeros_like(scale, dtype=torch.int32)
        return self.weight_observer.calculate_qparams()

    def input_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scale, zero_point)`` of the input: the learned scale (LSQ) or the input observer's."""
        if self.learnable_scales:
            scale = self.input_scale.detach().clamp(min=EPS).reshape(())
            return scale, self.input_zero_point.reshape(()).to(torch.int32)
        return self.input_observer.calculate_qparams()

    def scales_from_observers(self) -> list[tuple[nn.Parameter, torch.Tensor]]:
        """LSQ: each learnable scale with the observer's value it starts from; sets the input zero point too."""
        pairs = [(self.weight_scale, self.weight_observer.calculate_qparams()[0].reshape(-1))]
        if self.input_observer is not None:
            scale, zero_point = self.input_observer.calculate_qparams()
            pairs.append((self.input_scale, scale.reshape(1)))
            self.input_zero_point.copy_(zero_point.reshape(1).float())
        self.scales_initialized.fill_(True)
        return pairs

    def quantized_weight(self) -> torch.Tensor:
        """The weight as forward uses it: observed (in training mode only), then fake-quantized when enabled."""
        view = self.grouped(self.weight)
        if self.training:
            self.weight_observer(view)
        if self._skips_fake_quant():
            return self.weight
        if self.learnable_scales:
            _, qmax = qrange(self.weight_spec)
            factor = (view.numel() / self.weight_scale.numel() * qmax) ** -0.5
            fake = learnable_fake_quantize(view, self.weight_scale, torch.zeros(1), self.weight_spec, factor)
        else:
            fake = fake_quantize(view, *self.weight_observer.calculate_qparams(), self.weight_spec)
        fake = self.ungrouped(fake)
        return torch.where(self.fake_quant_enabled, fake, self.weight) if self.learnable_scales else fake

    def quantized_input(self, x: torch.Tensor) -> torch.Tensor:
        """The input as forward uses it: unchanged without an activation spec, else observed and fake-quantized."""
        if self.input_observer is None:
            return x
        if self.training:  # ranges come from training batches: validation and inference never move them
            self.input_observer(x)
        if self._skips_fake_quant():
            return x
        if self.learnable_scales:
            _, qmax = qrange(self.activation_spec)
            factor = (max(1, x[0].numel() if x.dim() > 1 else x.numel()) * qmax) ** -0.5
            zero = self.input_zero_point.expand(1)
            fake = learnable_fake_quantize(x, self.input_scale, zero, self.activation_spec, factor)
        else:
            fake = fake_quantize(x, *self.input_observer.calculate_qparams(), self.activation_spec)
        return torch.where(self.fake_quant_enabled, fake, x) if self.learnable_scales else fake

    def storage(self) -> LayerStorage:
        """Weight and bias as parameters; bytes as the int8 layer this one converts to once it fake-quantizes (its
        integers, scales, bias and input scale and zero point, packed), as its float tensors before. Collective
        under ZeRO-3."""
        float_params = [self.weight] + ([] if self.bias is None else [self.bias])
        scales = [self.weight_scale] if self.learnable_scales else []
        with gathered(float_params + scales):
            tensors = [p.detach() for p in float_params]
            params = sum(t.numel() for t in tensors)
            nonzeros = sum(int(torch.count_nonzero(t)) for t in tensors)
            if not bool(self.fake_quant_enabled):
                packed = sum(packed_nbytes(t) for t in tensors)
            else:
                scale, zero_point = self.weight_qparams()
                integers = quantize(self.grouped(tensors[0]), scale, zero_point, self.weight_spec)
                nonzeros += int(torch.count_nonzero(integers)) - int(torch.count_nonzero(tensors[0]))  # rounded to 0
                packed = packed_nbytes(integers) + packed_nbytes(scale.reshape(-1).float())
                packed += sum(packed_nbytes(t) for t in tensors[1:])
                if self.input_observer is not None:
                    input_scale, input_zero_point = self.input_qparams()
                    packed += packed_nbytes(input_scale.reshape(()).float())
                    packed += packed_nbytes(input_zero_point.reshape(()).to(torch.int32))
        return LayerStorage(params, nonzeros, 4 * params, packed)

    def compression_figures(self) -> LayerFigures:
        """The layer as it will be exported: ``bits`` is the weight width, so int8 savings show in bytes.

        FLOPs follow the project's rule of counting non-zeros (``flops_factor`` = weight density); the cheaper integer
        arithmetic is not folded into it but reported through ``bits``. Collective under ZeRO-3.
        """
        with gathered([self.weight]):
            nonzeros = int(torch.count_nonzero(self.weight.detach()))
        shape = tuple(full_shape(self.weight))
        shape = shape[::-1] if self._transposed_weight else shape  # (out, in), as the protocol wants
        total = int(torch.Size(shape).numel())
        return LayerFigures(
            weight_shape=shape,
            params_dense=total,
            params_effective=nonzeros,
            bits=self.weight_spec.bits,
            rank=None,
            flops_factor=nonzeros / total if total else 1.0,
        )


def _sync_flag_copy(module: nn.Module, incompatible_keys: object) -> None:
    """After ``load_state_dict``: the host-side copy of ``fake_quant_enabled`` follows the loaded buffer."""
    module._fake_quant_on = bool(module.fake_quant_enabled)


class QATLinear(_QATBase):
    """``nn.Linear`` with fake-quantized weight (per output channel, or per group of ``group_size`` consecutive input
    weights) and optionally input (per tensor)."""

    int8_class = Int8Linear

    def __init__(
        self,
        weight: nn.Parameter,
        bias: nn.Parameter | None,
        weight_spec: QuantSpec = DEFAULT_WEIGHT_SPEC,
        activation_spec: QuantSpec | None = None,
        group_size: int | None = None,
        learnable_scales: bool = False,
    ) -> None:
        super().__init__()
        shape = full_shape(weight)  # (out, in); (in, out) for a transposed subclass (transformers' Conv1D)
        self.out_features, self.in_features = shape[::-1] if self._transposed_weight else shape
        self._init_quantization(weight, bias, weight_spec, activation_spec, group_size, learnable_scales)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        weight_spec: QuantSpec = DEFAULT_WEIGHT_SPEC,
        activation_spec: QuantSpec | None = None,
        group_size: int | None = None,
        learnable_scales: bool = False,
    ) -> QATLinear:
        """A QAT layer that shares ``linear.weight`` and ``linear.bias`` (the same Parameter objects)."""
        cls.check_float_layer(linear)
        return cls(linear.weight, linear.bias, weight_spec, activation_spec, group_size, learnable_scales)

    @classmethod
    def check_float_layer(cls, layer: nn.Module) -> None:
        """Refuse a layer that this class cannot take the Parameters of (a subclass takes another layer type)."""
        if not isinstance(layer, nn.Linear):
            raise TypeError(f"`from_linear` takes an nn.Linear, got {type(layer).__name__}.")

    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` holding this layer's Parameters (no copy)."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight = self.weight
        linear.bias = self.bias
        return linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._integer_exact():
            return self._exact_output(x, F.linear, -1)
        return F.linear(self.quantized_input(x), self.quantized_weight(), self.bias)

    def extra_repr(self) -> str:
        group = "" if self.group_size is None else f", group_size={self.group_size}"
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}{group}"


def check_group_size(group_size: int, shape: torch.Size, weight_spec: QuantSpec) -> None:
    """A group size must be a positive int that divides the input dimension of a per-channel ``[out, in]`` weight."""
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"`group_size` must be None or a positive int, got {group_size!r}.")
    if len(shape) != 2 or not weight_spec.per_channel or weight_spec.channel_axis != 0:
        raise ValueError("`group_size` applies to Linear weights quantized per output channel (channel_axis=0).")
    if shape[1] % group_size:
        raise ValueError(
            f"`group_size`={group_size} does not divide the layer's {shape[1]} input features."
            f" HINT: pick a divisor of {shape[1]}, or exclude this layer."
        )


class QATConv2d(_QATBase):
    """``nn.Conv2d`` (zero padding) with fake-quantized weight (per output channel) and optionally input."""

    float_type: type[nn.Module] = nn.Conv2d
    int8_class = Int8Conv2d

    def __init__(
        self,
        weight: nn.Parameter,
        bias: nn.Parameter | None,
        stride: tuple[int, ...],
        padding: tuple[int, ...] | str,
        dilation: tuple[int, ...],
        groups: int,
        weight_spec: QuantSpec = DEFAULT_WEIGHT_SPEC,
        activation_spec: QuantSpec | None = None,
        learnable_scales: bool = False,
    ) -> None:
        super().__init__()
        out_channels, in_per_group, *kernel = full_shape(weight)
        self.in_channels, self.out_channels = in_per_group * groups, out_channels
        self.kernel_size = tuple(kernel)
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups
        self._init_quantization(weight, bias, weight_spec, activation_spec, learnable_scales=learnable_scales)

    @classmethod
    def from_conv(
        cls,
        conv: nn.Module,
        weight_spec: QuantSpec = DEFAULT_WEIGHT_SPEC,
        activation_spec: QuantSpec | None = None,
        learnable_scales: bool = False,
    ) -> QATConv2d:
        """A QAT layer that shares ``conv.weight`` and ``conv.bias`` and keeps its stride/padding/dilation/groups."""
        if not isinstance(conv, cls.float_type):
            raise TypeError(f"`{cls.__name__}` takes an nn.{cls.float_type.__name__}, got {type(conv).__name__}.")
        if conv.padding_mode != "zeros":
            raise ValueError(
                f"{cls.__name__} supports `padding_mode='zeros'` only, got {conv.padding_mode!r}."
                " HINT: exclude this layer from quantization."
            )
        return cls(
            conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups, weight_spec, activation_spec,
            learnable_scales,
        )  # fmt: skip

    from_conv2d = from_conv

    def to_float(self) -> nn.Module:
        """A plain float convolution holding this layer's Parameters (no copy)."""
        conv = self.float_type(
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            groups=self.groups,
            bias=self.bias is not None,
            device="meta",
        )
        conv.weight = self.weight
        conv.bias = self.bias
        return conv

    to_conv2d = to_float

    def _conv(self, x: torch.Tensor, weight: torch.Tensor, bias: Any = _OWN_BIAS) -> torch.Tensor:
        bias = self.bias if bias is _OWN_BIAS else bias
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._integer_exact():
            return self._exact_output(x, lambda inputs, weight: self._conv(inputs, weight, None), 1)
        return self._conv(self.quantized_input(x), self.quantized_weight())

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride},"
            f" padding={self.padding}, dilation={self.dilation}, groups={self.groups}, bias={self.bias is not None}"
        )


class QATConv1d(QATConv2d):
    """``nn.Conv1d`` (zero padding) with fake-quantized weight (per output channel) and optionally input."""

    float_type = nn.Conv1d
    int8_class = Int8Conv1d
    from_conv1d = vars(QATConv2d)["from_conv"]  # the classmethod itself: ``QATConv2d.from_conv`` is bound to QATConv2d
    to_conv1d = QATConv2d.to_float

    def _conv(self, x: torch.Tensor, weight: torch.Tensor, bias: Any = _OWN_BIAS) -> torch.Tensor:
        bias = self.bias if bias is _OWN_BIAS else bias
        return F.conv1d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)
