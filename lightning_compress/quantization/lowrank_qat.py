"""QAT of factorised layers: a low-rank layer whose two factors are fake-quantized, and its int8 form.

:class:`QATLowRankLinear` / :class:`QATLowRankConv2d` / :class:`QATLowRankConv1D` subclass the factorised layers of
``lightning_compress.lowrank`` (same ``weight`` view, ``in_features`` / conv geometry, ``nf``/``nx``, ``rank``,
``set_rank_mask``...). ``from_lowrank`` shares the wrapped layer's ``first`` / ``second`` / ``bias`` Parameters and
its ``rank_mask`` buffer (the same objects: optimizers, DDP and DeepSpeed see no new parameters; the state dict keeps
the low-rank keys, plus the observers'). Forward, ``y = second(first(x))``:

- with activation bits, the input and the intermediate activation ``first(x)`` are observed and fake-quantized per
  tensor (asymmetric);
- each factor is masked by ``rank_mask`` (a switched-off component is zero in both), then observed and fake-quantized:
  ``first`` with one scale per component (row), ``second`` one per output channel (row). A switched-off component
  quantizes to exactly 0 (symmetric: zero point 0) and widens no range once off;
- until ``fake_quant_enabled`` is set it only observes (at full rank: exactly the low-rank layer's outputs); the
  flag and ``enable_fake_quant`` / ``enable_observers`` are ``QATLinear``'s, so the QAT schedule drives it too.

**Rank mask and truncation.** ``LowRankRefactoring`` keeps lowering the rank through the shared mask: the active count
is re-read from the mask whenever it was written (by whichever layer object), and the statistics the callback hands
the wrapped layer are fed here. At fit end the callback truncates: :meth:`truncated` is a smaller QAT layer of the
active components, observer ranges carried over (the first factor's per component), computing the same;
:meth:`to_dense` (factors that would save nothing) is the ``QATLinear`` / ``QATConv2d`` of the dense weight, its
range observed from it (a ``Conv1D`` stays factorised). The int8 form (:meth:`to_int8`, used by ``convert_to_int8``
and ``save_compressed``) takes only the active components, truncated or not: :class:`Int8LowRankLinear` and friends
hold two int8 layers (``first``: inputs to ``rank``; ``second``: ``rank`` to outputs, with the bias) and compute what
the QAT layer computes in eval mode, up to float rounding. Learnable scales (LSQ) are not supported here.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from lightning_compress.distributed import gathered
from lightning_compress.lowrank.layers import LowRankConv1D, LowRankConv2d, LowRankLinear
from lightning_compress.packing import packed_nbytes
from lightning_compress.protocol import LayerFigures, LayerStorage
from lightning_compress.quantization.fake_quant import QuantSpec, fake_quantize, quantize
from lightning_compress.quantization.int8 import Int8Conv2d, Int8Linear
from lightning_compress.quantization.layers import DEFAULT_WEIGHT_SPEC, QATConv2d, QATLinear, _QATBase, _sync_flag_copy
from lightning_compress.quantization.observers import MinMaxObserver, MovingAverageObserver

__all__ = ["Int8LowRankConv1D", "Int8LowRankConv2d", "Int8LowRankLinear", "QATLowRankConv1D", "QATLowRankConv2d",
           "QATLowRankLinear"]  # fmt: skip


def _bits_of(weight_spec: QuantSpec, activation_spec: QuantSpec | None) -> tuple[int, int | None]:
    """The bit widths of the specs the int8 layers implement (those ``QuantizationAwareTraining`` builds)."""
    if not isinstance(weight_spec, QuantSpec) or weight_spec != QuantSpec(weight_spec.bits, True, True, 0):
        raise ValueError(
            f"`weight_spec` must be a symmetric per-channel QuantSpec along axis 0, got {weight_spec!r}."
            " HINT: QuantSpec(bits=8, symmetric=True, per_channel=True, channel_axis=0)."
        )
    if activation_spec is None:
        return weight_spec.bits, None
    if not isinstance(activation_spec, QuantSpec) or activation_spec != QuantSpec(activation_spec.bits, False, False):
        raise ValueError(
            f"`activation_spec` must be None or an asymmetric per-tensor QuantSpec, got {activation_spec!r}."
            " HINT: QuantSpec(bits=8, symmetric=False, per_channel=False)."
        )
    return weight_spec.bits, activation_spec.bits


class _QATFactors:
    """Observers, fake quantization, mask tracking and the int8 conversion shared by the QAT factorised layers
    (placed before the low-rank class in each layer's bases)."""

    int8_class: ClassVar[type[nn.Module]]
    lowrank_class: ClassVar[type[nn.Module]]
    learnable_scales = False  # read by QuantizationAwareTraining's LSQ start
    fake_quant_enabled: torch.Tensor

    def __init__(self, *args: Any, weight_bits: int = 8, activation_bits: int | None = None, **kwargs: Any) -> None:
        """The low-rank layer's constructor arguments (``lowrank_class``), then the bit widths."""
        self.lowrank_class.__init__(self, *args, **kwargs)
        self.weight_bits, self.activation_bits = weight_bits, activation_bits
        self.weight_spec = QuantSpec(bits=weight_bits, symmetric=True, per_channel=True, channel_axis=0)
        spec = None if activation_bits is None else QuantSpec(bits=activation_bits, symmetric=False, per_channel=False)
        self.activation_spec = spec
        self.first_observer = MinMaxObserver(self.weight_spec, self.rank)
        self.second_observer = MinMaxObserver(self.weight_spec, self.dense_weight_shape()[0])
        self.input_observer = None if spec is None else MovingAverageObserver(spec)
        self.hidden_observer = None if spec is None else MovingAverageObserver(spec)
        self.register_buffer("fake_quant_enabled", torch.tensor(False))
        self._fake_quant_on = False  # host-side copy of the flag (see QATLinear)
        self.register_load_state_dict_post_hook(_sync_flag_copy)

    @classmethod
    def from_lowrank(cls, layer: nn.Module, weight_spec: QuantSpec = DEFAULT_WEIGHT_SPEC,
                     activation_spec: QuantSpec | None = None, *,
                     learnable_scales: bool = False) -> nn.Module:  # fmt: skip
        """The QAT layer that shares ``layer``'s ``first``, ``second``, ``bias`` and ``rank_mask`` (the same
        objects), observing only until ``enable_fake_quant()``."""
        if type(layer) is not cls.lowrank_class:
            raise TypeError(
                f"`{cls.__name__}.from_lowrank` takes a {cls.lowrank_class.__name__}, got {type(layer).__name__}. HINT:"
                " QATLowRank{Linear,Conv2d,Conv1D} wrap LowRank{Linear,Conv2d,Conv1D} (the exact type)."
            )
        if learnable_scales:
            raise ValueError(
                "`learnable_scales`=True is not supported for factorised layers."
                " HINT: learnable_scales=False, or exclude the low-rank layers from QuantizationAwareTraining."
            )
        weight_bits, activation_bits = _bits_of(weight_spec, activation_spec)
        out = cls(**layer.rebuild_args(), weight_bits=weight_bits, activation_bits=activation_bits)
        out.first, out.second, out.bias = layer.first, layer.second, layer.bias
        out.rank_mask = layer.rank_mask
        for observer in out._observers().values():
            observer.to(layer.first.device)
        out.fake_quant_enabled = out.fake_quant_enabled.to(layer.first.device)
        object.__setattr__(out, "_source", layer)  # not a submodule: only to read the statistics fed to it
        return out.train(layer.training)

    @property
    def _active(self) -> int:
        """Active components, re-counted whenever ``rank_mask`` was written (here, through the wrapped layer, or by
        ``load_state_dict``): its version counter moves with every in-place write."""
        mask = self.rank_mask
        key = (mask.data_ptr(), mask._version)
        if self.__dict__.get("_mask_key") != key:
            self.__dict__["_active_count"], self.__dict__["_mask_key"] = int(mask.sum()), key
        return self.__dict__["_active_count"]

    @_active.setter
    def _active(self, value: int) -> None:
        self.__dict__["_active_count"] = int(value)
        self.__dict__["_mask_key"] = (self.rank_mask.data_ptr(), self.rank_mask._version)

    @property
    def statistics(self) -> Any:
        """What ``LowRankRefactoring`` feeds: set on this layer, or else on the layer it wraps (the one it holds)."""
        own, source = self.__dict__.get("_own_statistics"), self.__dict__.get("_source")
        return own if own is not None or source is None else source.statistics

    @statistics.setter
    def statistics(self, value: Any) -> None:
        self.__dict__["_own_statistics"] = value

    enable_fake_quant = _QATBase.enable_fake_quant  # quantize in forward (True) or only observe (False)

    def enable_observers(self, enabled: bool = True) -> None:
        """Keep updating (True) or freeze (False) the factor, input and intermediate ranges."""
        for observer in self._observers().values():
            observer.set_enabled(enabled)

    def _observers(self) -> dict[str, nn.Module]:
        observers = {"first": self.first_observer, "second": self.second_observer, "input": self.input_observer}
        return {k: v for k, v in {**observers, "intermediate": self.hidden_observer}.items() if v is not None}

    def _factor(self, param: torch.Tensor, observer: MinMaxObserver, component_dim: int) -> torch.Tensor:
        """A factor as forward uses it: masked, observed (training mode), fake-quantized when enabled."""
        value = param
        if self._active != self.rank:
            shape = [1] * param.dim()
            shape[component_dim] = -1
            value = param * self.rank_mask.to(param.dtype).reshape(shape)
        if self.training:
            observer(value)
        if not self._fake_quant_on:
            return value
        return fake_quantize(value, *observer.calculate_qparams(), self.weight_spec)

    def _activation(self, x: torch.Tensor, observer: MovingAverageObserver | None) -> torch.Tensor:
        if observer is None:
            return x
        if self.training:
            observer(x)
        return fake_quantize(x, *observer.calculate_qparams(), self.activation_spec) if self._fake_quant_on else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first = self._factor(self.first, self.first_observer, 0)
        hidden = self._first_op(self._activation(x, self.input_observer), first)
        if self.statistics is not None:
            self._observe(x, hidden)
        second = self._factor(self.second, self.second_observer, 1)
        return self._second_op(self._activation(hidden, self.hidden_observer), second)

    def to_int8(self) -> nn.Module:
        """The int8 layer of the active components, computing what this layer computes in eval mode."""
        unseen = [kind for kind, seen in self._observers().items() if not bool(torch.isfinite(seen.min_val).all())]
        if unseen:
            raise ValueError(
                f"`{type(self).__name__}` has never observed its {', '.join(unseen)} range(s), so it has no scale to"
                " convert with. HINT: train (or calibrate) for at least one step with QuantizationAwareTraining first."
            )
        keep = self.rank_mask.nonzero().flatten()
        args = {k: v for k, v in self.rebuild_args().items() if k != "inference_layout"}
        out = self.int8_class(**{**args, "rank": int(keep.numel())}).to(self.first.device)
        first_scale, _ = self.first_observer.calculate_qparams()
        second_scale, _ = self.second_observer.calculate_qparams()
        first, second = self.first.detach()[keep], self.second.detach()[:, keep]
        zeros = torch.zeros(1, dtype=torch.int32)  # symmetric weights; the buffers take no gradient (no no_grad)
        _load(out.first, quantize(first, first_scale[keep], zeros, self.weight_spec), first_scale[keep], None,
              self.input_observer)  # fmt: skip
        _load(out.second, quantize(second, second_scale, zeros, self.weight_spec), second_scale, self.bias,
              self.hidden_observer)  # fmt: skip
        return out.eval()

    def export_form(self) -> nn.Module:
        """What ``save_compressed`` writes: the int8 layer once it fake-quantizes, else this layer."""
        return self.to_int8() if self._fake_quant_on else self

    def truncated(self) -> nn.Module:
        """A smaller QAT layer of the active components, observers and flag carried over (it computes the same)."""
        keep = self.rank_mask.nonzero().flatten()
        out = super().truncated()
        for name, observer in self._observers().items():
            state = observer.state_dict()
            if name == "first":
                state = {**state, "min_val": state["min_val"][keep], "max_val": state["max_val"][keep]}
            out._observers()[name].load_state_dict(state)
        out.enable_fake_quant(self._fake_quant_on)
        return out.train(self.training)

    def to_dense(self) -> nn.Module:
        """The QAT layer of the dense weight the active components compute (its weight range observed from it,
        input range and flags carried over); a transformers Conv1D stays factorised (:meth:`truncated`)."""
        dense = super().to_dense()
        if type(dense) is nn.Linear:
            qat = QATLinear.from_linear(dense, self.weight_spec, self.activation_spec)
        elif type(dense) is nn.Conv2d:
            qat = QATConv2d.from_conv(dense, self.weight_spec, self.activation_spec)
        else:
            return self.truncated()
        qat.weight_observer(qat.weight)
        if self.input_observer is not None:
            qat.input_observer.load_state_dict(self.input_observer.state_dict())
        qat.enable_observers(bool(self.first_observer.enabled))
        qat.enable_fake_quant(self._fake_quant_on)
        return qat.train(self.training)

    def rebuild_args(self) -> dict[str, Any]:
        """The low-rank layer's constructor arguments plus the bit widths (JSON-able)."""
        return {**super().rebuild_args(), "weight_bits": self.weight_bits, "activation_bits": self.activation_bits}

    def compression_figures(self) -> LayerFigures:
        """The low-rank figures (rank, effective parameters, FLOPs) with ``bits`` the factors' width."""
        return dataclasses.replace(super().compression_figures(), bits=self.weight_bits)

    def storage(self) -> LayerStorage:
        """As the low-rank layer; bytes as the int8 layer once it fake-quantizes. Collective under ZeRO-3."""
        base = super().storage()
        if not self._fake_quant_on:
            return base
        with gathered([p for p in (self.first, self.second, self.bias) if p is not None]):
            packed = sum(packed_nbytes(b) for b in self.to_int8().buffers())
        return dataclasses.replace(base, bytes_compressed=packed)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, weight_bits={self.weight_bits}, activation_bits={self.activation_bits}"


def _load(layer: nn.Module, integers: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, observer) -> None:
    layer.qweight.copy_(integers.reshape(layer.qweight.shape))
    layer.weight_scale.copy_(scale.reshape(-1))
    if bias is not None:
        layer.bias.copy_(bias.detach())
    if observer is not None:
        input_scale, input_zero_point = observer.calculate_qparams()
        layer.input_scale.copy_(input_scale.reshape(()))
        layer.input_zero_point.copy_(input_zero_point.reshape(()))


class _Int8Factors(nn.Module):
    """Two int8 layers, ``second(first(x))``: the int8 form of a QAT factorised layer (see the module docstring)."""

    first: nn.Module
    second: nn.Module
    _transposed_weight = False

    def _init_args(self, args: dict[str, Any]) -> None:
        self._args = {k: v for k, v in args.items() if k not in ("self", "__class__")}
        self.weight_bits, self.activation_bits = args["weight_bits"], args["activation_bits"]

    def rebuild_args(self) -> dict[str, Any]:
        """The constructor arguments (JSON-able) that rebuild this layer's empty skeleton."""
        return dict(self._args)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))

    @property
    def rank(self) -> int:
        return int(self.first.qweight.shape[0])

    active_rank = rank

    @property
    def bias(self) -> torch.Tensor | None:
        return self.second.bias

    @property
    def weight(self) -> torch.Tensor:
        """The float dense weight the integers stand for (a new tensor at each read), in the replaced layer's shape."""
        first, second = self.first.float_weight().flatten(1), self.second.float_weight().flatten(1)
        dense = (second @ first).reshape(self.dense_weight_shape()).to(self.second.weight_scale.dtype)
        return dense.t() if self._transposed_weight else dense

    def _effective(self) -> tuple[int, int]:
        shape = self.dense_weight_shape()
        dense = math.prod(shape)
        return dense, self.rank * (shape[0] + dense // shape[0])

    def compression_figures(self) -> LayerFigures:
        dense, effective = self._effective()
        return LayerFigures(self.dense_weight_shape(), dense, effective, self.weight_bits, self.rank, effective / dense)

    def storage(self) -> LayerStorage:
        """Dense: the replaced weight and the bias at fp32; compressed: every buffer as ``save_compressed`` writes."""
        dense, effective = self._effective()
        bias = [] if self.bias is None else [self.bias]
        params = dense + sum(b.numel() for b in bias)
        nonzeros = effective + sum(int(torch.count_nonzero(b)) for b in bias)
        return LayerStorage(params, nonzeros, 4 * params, sum(packed_nbytes(b) for b in self.buffers()))

    def extra_repr(self) -> str:
        return f"rank={self.rank}, weight_bits={self.weight_bits}, activation_bits={self.activation_bits}"


class Int8LowRankLinear(_Int8Factors):
    """Int8 factors of a Linear: ``first`` an :class:`Int8Linear` ``in -> rank``, ``second`` ``rank -> out``."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True, weight_bits: int = 8,
                 activation_bits: int | None = 8) -> None:  # fmt: skip
        super().__init__()
        self._init_args(locals())
        self.in_features, self.out_features = in_features, out_features
        self.first = Int8Linear(in_features, rank, False, weight_bits, activation_bits)
        self.second = Int8Linear(rank, out_features, bias, weight_bits, activation_bits)

    def dense_weight_shape(self) -> tuple[int, ...]:
        return (self.out_features, self.in_features)


class Int8LowRankConv1D(Int8LowRankLinear):
    """Int8 factors of a transformers Conv1D: ``weight`` is ``(in, out)``, with ``nf``/``nx``."""

    _transposed_weight = True
    nf, nx = LowRankConv1D.nf, LowRankConv1D.nx


class Int8LowRankConv2d(_Int8Factors):
    """Int8 factors of a Conv2d: ``first`` an :class:`Int8Conv2d` ``kh x kw`` into ``rank``, ``second`` a 1x1."""

    groups, padding_mode = 1, "zeros"  # as LowRankConv2d

    def __init__(self, in_channels: int, out_channels: int, kernel_size: list[int], rank: int, stride: list[int],
                 padding: list[int] | str, dilation: list[int], bias: bool = True, weight_bits: int = 8,
                 activation_bits: int | None = 8) -> None:  # fmt: skip
        super().__init__()
        self._init_args(locals())
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.dilation = tuple(kernel_size), tuple(stride), tuple(dilation)
        self.padding = padding if isinstance(padding, str) else tuple(padding)
        self.first = Int8Conv2d(in_channels, rank, list(kernel_size), list(stride), padding, list(dilation), 1, False,
                                weight_bits, activation_bits)  # fmt: skip
        self.second = Int8Conv2d(rank, out_channels, [1, 1], [1, 1], [0, 0], [1, 1], 1, bias, weight_bits,
                                 activation_bits)  # fmt: skip

    def dense_weight_shape(self) -> tuple[int, ...]:
        return (self.out_channels, self.in_channels, *self.kernel_size)


class QATLowRankLinear(_QATFactors, LowRankLinear):
    """A :class:`LowRankLinear` with fake-quantized factors (and optionally input and intermediate activation)."""

    lowrank_class, int8_class = LowRankLinear, Int8LowRankLinear

    def _first_op(self, x: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
        return F.linear(x, first)

    def _second_op(self, hidden: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, second, self.bias)


class QATLowRankConv1D(QATLowRankLinear, LowRankConv1D):
    """A :class:`LowRankConv1D` (transformers' Conv1D as factors) with fake-quantized factors."""

    lowrank_class, int8_class = LowRankConv1D, Int8LowRankConv1D


class QATLowRankConv2d(_QATFactors, LowRankConv2d):
    """A :class:`LowRankConv2d` (``kh x kw`` conv into ``rank`` channels, then 1x1) with fake-quantized factors."""

    lowrank_class, int8_class = LowRankConv2d, Int8LowRankConv2d

    def _first_op(self, x: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, first, None, self.stride, self.padding, self.dilation)

    def _second_op(self, hidden: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        return F.conv2d(hidden, second.reshape(*second.shape, 1, 1), self.bias)
