"""QAT and int8 layers for transformers' ``Conv1D`` (GPT-2's attention and MLP: ``y = x @ W + b``, ``W`` stored
``(in, out)``, ``nf`` outputs and ``nx`` inputs).

:class:`QATConv1D` is a :class:`QATLinear` that shares the Conv1D's ``weight`` and ``bias`` Parameters (the same
objects, still ``(in, out)``) and quantizes the weight as its ``(out, in)`` view: one scale per output feature (axis 1
of the stored weight), or per group of ``group_size`` consecutive input weights of an output feature.
:class:`Int8Conv1D` is an :class:`Int8Linear` (integers ``(out, in)``, oneDNN's integer Linear) whose ``weight`` is
the float weight in the ``(in, out)`` layout of the layer it replaced, with ``nf``/``nx``, so model code written for
Conv1D keeps working. transformers is imported only to hand back a plain Conv1D (:meth:`QATConv1D.to_conv1d`).
"""

from __future__ import annotations

import torch
from torch import nn

from lightning_compress.quantization.int8 import Int8Linear
from lightning_compress.quantization.layers import QATLinear
from lightning_compress.targeting import weight_is_transposed

__all__ = ["Int8Conv1D", "QATConv1D"]


class _Conv1DAttributes:
    """``nf`` (outputs) and ``nx`` (inputs), as on transformers' Conv1D, from ``out_features``/``in_features``."""

    in_features: int
    out_features: int
    nf = property(lambda self: self.out_features, doc="The number of output features (Conv1D's ``nf``).")
    nx = property(lambda self: self.in_features, doc="The number of input features (Conv1D's ``nx``).")


class Int8Conv1D(_Conv1DAttributes, Int8Linear):
    """transformers' ``Conv1D`` as int8: computes as :class:`Int8Linear` (integers stored ``(out, in)``); ``weight``
    is the dequantized float weight ``(in, out)``, as the Conv1D's. Its ``rebuild_args`` are Int8Linear's."""

    @property
    def weight(self) -> torch.Tensor:
        """The float weight the integers stand for, ``(in, out)`` like the Conv1D's (a new tensor at each read)."""
        return self.float_weight().to(self.weight_scale.dtype).t()

    def extra_repr(self) -> str:
        return f"nf={self.nf}, nx={self.nx}, " + super().extra_repr()


class QATConv1D(_Conv1DAttributes, QATLinear):
    """transformers' ``Conv1D`` with fake-quantized weight (per output feature, or per group of ``group_size``
    consecutive input weights) and optionally input (per tensor); ``weight`` stays the Conv1D's ``(in, out)``
    Parameter. Build it with :meth:`from_conv1d` (QATLinear's constructor arguments, the weight ``(in, out)``)."""

    int8_class = Int8Conv1D
    _transposed_weight = True
    from_conv1d = vars(QATLinear)["from_linear"]  # the classmethod itself, which checks with check_float_layer

    @classmethod
    def check_float_layer(cls, layer: nn.Module) -> None:
        if not weight_is_transposed(layer):
            raise TypeError(
                f"`conv1d` must be a transformers.pytorch_utils.Conv1D, got {type(layer).__name__}."
                " HINT: QATLinear.from_linear takes an nn.Linear."
            )

    def to_conv1d(self) -> nn.Module:
        """A plain transformers ``Conv1D`` holding this layer's Parameters (no copy)."""
        from transformers.pytorch_utils import Conv1D  # only here: handing a Conv1D back needs transformers

        with torch.device("meta"):
            conv1d = Conv1D(self.nf, self.nx)
        conv1d.weight = self.weight
        conv1d.bias = self.bias
        return conv1d

    to_linear = to_conv1d  # the float layer it came from: an nn.Linear cannot hold an (in, out) weight

    def dense_weight_shape(self) -> tuple[int, ...]:
        """``(out, in)``, as the protocol wants (the stored weight is its transpose); shapes only, never a gather."""
        return (self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """As Conv1D's ``addmm(bias, x, W)`` over the last dimension, with the fake-quantized input and weight."""
        if self._integer_exact():
            return self._exact_output(x, torch.matmul, -1)
        x = self.quantized_input(x)
        flat = x.reshape(-1, x.shape[-1])
        weight = self.quantized_weight()
        out = flat @ weight if self.bias is None else torch.addmm(self.bias, flat, weight)
        return out.reshape(*x.shape[:-1], self.nf)

    def extra_repr(self) -> str:
        group = "" if self.group_size is None else f", group_size={self.group_size}"
        return f"nf={self.nf}, nx={self.nx}{group}"
