"""Factorised layers: a Linear, Conv2d or transformers' Conv1D held as two factors with a rank mask (the shared
part, and the SVD behind it, are in ``factorised.py``).

Convolutions: the SVD of the flattened kernel gives a ``kh x kw`` convolution into ``rank`` channels followed by a
1x1 convolution to the outputs. It is the optimal rank-``r`` approximation of the layer's matrix (Eckart-Young), uses
the same code as Linear, and runs as two ordinary convolutions on every backend; Tucker-2 would add a third
convolution for a second rank that small convolutions rarely need.

transformers' ``Conv1D`` (GPT-2: ``y = x @ W + b``, ``W`` stored ``(in, out)``) is a Linear with a transposed weight:
:class:`LowRankConv1D` factorises it as a LowRankLinear whose ``weight`` and ``nf``/``nx`` are the Conv1D's.

Each layer is a drop-in for the one it replaces (DESIGN principle 9): it keeps that layer's attributes
(``in_features``, ``kernel_size``, ...) and a ``weight`` of its shape, dtype and device, which model code reads for
``x.to(layer.weight.dtype)``; the product behind it is formed only when computed with (``dense_view``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lightning_compress.distributed import full_shape, gathered
from lightning_compress.lowrank.factorised import _Factorised, factor
from lightning_compress.targeting import weight_is_transposed

__all__ = ["LowRankConv1D", "LowRankConv2d", "LowRankLinear", "factor", "factorise_layer", "weight_matrix"]


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The ``[out, n]`` matrix a Linear, Conv2d (``n = in * kh * kw``) or transformers' Conv1D multiplies its inputs
    by: a view of its ``weight`` (full only where gathered under ZeRO-3)."""
    weight = module.weight
    return weight.t() if weight_is_transposed(module) else weight.reshape(weight.shape[0], -1)


def factorise_layer(module: nn.Module, rank: int | None = None) -> tuple[_Factorised, torch.Tensor]:
    """The full-rank factorised layer computing what ``module`` computes (with ``rank``: its best approximation of
    that rank, factors that small), and its singular values. Gathers under ZeRO-3. Raises TypeError for a layer of
    another type, ValueError for a grouped or non-zero-padded Conv2d."""
    if isinstance(module, nn.Linear):
        return LowRankLinear.from_linear(module, rank)
    if isinstance(module, nn.Conv2d):
        return LowRankConv2d.from_conv2d(module, rank)
    if weight_is_transposed(module):
        return LowRankConv1D.from_conv1d(module, rank)
    raise TypeError(
        f"`module` is a {type(module).__name__}, which has no factorised form; supported: nn.Linear, nn.Conv2d"
        " (groups=1, zero padding) and transformers' Conv1D. HINT: exclude it from the layers to factorise."
    )


class LowRankLinear(_Factorised):
    """``y = second @ (first @ x) + bias``: a Linear ``[out, in]`` as factors ``[rank, in]`` and ``[out, rank]``.

    ``inference_layout=True`` (what truncation produces) keeps each factor's memory in its transpose's row-major
    order, shapes unchanged: ``F.linear`` then multiplies by a row-major ``[in, rank]`` / ``[rank, out]`` matrix, which
    CPU GEMMs (MKL) run markedly faster for thin factors than the transposed operand a Linear weight gives them
    (measured: a rank-128 4 x Linear(1024) MLP's factors in 0.92 ms against 1.30 ms, 1 thread). Training layers keep
    the default layout, which DDP's gradient buckets and DeepSpeed's flat buffers expect.
    """

    def __init__(
        self, in_features: int, out_features: int, rank: int, bias: bool = True, inference_layout: bool = False
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.inference_layout = inference_layout
        self._init_factors((rank, in_features), (out_features, rank), bias, transposed=inference_layout)

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int | None = None) -> tuple[LowRankLinear, torch.Tensor]:
        """The full-rank factorisation of ``linear`` (same outputs; ``rank``: truncated to it) and its singular
        values. Gathers under ZeRO-3."""
        if weight_is_transposed(linear):
            raise TypeError(
                "`linear` is a transformers Conv1D, whose weight is stored (in, out): from_linear would factorise its"
                " transpose. HINT: LowRankConv1D.from_conv1d(layer), or factorise_layer(layer) for any supported layer."
            )
        return cls._from_dense(linear, rank)

    @classmethod
    def _from_dense(cls, dense: nn.Module, rank: int | None) -> tuple[LowRankLinear, torch.Tensor]:
        params = [dense.weight] + ([] if dense.bias is None else [dense.bias])
        with gathered(params):
            matrix = weight_matrix(dense)
            out_features, in_features = matrix.shape
            first, second, singular = factor(matrix, rank)
            layer = cls(in_features, out_features, first.shape[0], dense.bias is not None).to(first.device, first.dtype)
            layer._load_factors(first, second, dense.bias)
        return layer, singular

    def rebuild_args(self) -> dict[str, Any]:
        """The constructor arguments (JSON-able) of this layer's empty skeleton."""
        args = {"in_features": self.in_features, "out_features": self.out_features, "rank": self.rank,
                "bias": self.bias is not None}  # fmt: skip
        return {**args, "inference_layout": True} if self.inference_layout else args

    def _truncated_args(self) -> dict[str, Any]:
        return {"inference_layout": True}

    def dense_weight_shape(self) -> tuple[int, ...]:
        return (self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = F.linear(x, self.first)
        if self.statistics is not None:
            self._observe(x, hidden)
        return F.linear(self._masked(hidden, -1), self.second, self.bias)

    def _input_rows(self, x: torch.Tensor) -> torch.Tensor:
        return x.detach().reshape(-1, self.in_features)

    def _dense_skeleton(self) -> nn.Module:
        return nn.Linear(self.in_features, self.out_features, self.bias is not None)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank},"
            f" active_rank={self._active}, bias={self.bias is not None}"
        )


class LowRankConv2d(_Factorised):
    """A ``kh x kw`` convolution into ``rank`` channels (``first``), then a 1x1 convolution to the outputs
    (``second`` as ``[out, rank]``, with the bias). Zero padding, ``groups=1``."""

    groups = 1
    padding_mode = "zeros"

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: list[int],
        rank: int,
        stride: list[int],
        padding: list[int] | str,
        dilation: list[int],
        bias: bool = True,
    ) -> None:
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.dilation = tuple(kernel_size), tuple(stride), tuple(dilation)
        self.padding = padding if isinstance(padding, str) else tuple(padding)
        self._init_factors((rank, in_channels, *self.kernel_size), (out_channels, rank), bias)

    @classmethod
    def from_conv2d(cls, conv: nn.Conv2d, rank: int | None = None) -> tuple[LowRankConv2d, torch.Tensor]:
        """The full-rank factorisation of ``conv`` (same outputs; ``rank``: truncated to it) and its singular
        values. Gathers under ZeRO-3."""
        if conv.groups != 1 or conv.padding_mode != "zeros":
            raise ValueError(
                f"LowRankConv2d factorises convolutions with groups=1 and zero padding; got groups={conv.groups},"
                f" padding_mode={conv.padding_mode!r}. HINT: exclude this layer."
            )
        params = [conv.weight] + ([] if conv.bias is None else [conv.bias])
        with gathered(params):
            out_channels, in_channels, *kernel = full_shape(conv.weight)
            first, second, singular = factor(conv.weight.reshape(out_channels, -1), rank)
            padding = conv.padding if isinstance(conv.padding, str) else list(conv.padding)
            layer = cls(in_channels, out_channels, list(kernel), first.shape[0], list(conv.stride), padding,
                        list(conv.dilation), conv.bias is not None).to(first.device, first.dtype)  # fmt: skip
            layer._load_factors(first, second, conv.bias)
        return layer, singular

    def rebuild_args(self) -> dict[str, Any]:
        """The constructor arguments (JSON-able) of this layer's empty skeleton."""
        padding = self.padding if isinstance(self.padding, str) else list(self.padding)
        return {"in_channels": self.in_channels, "out_channels": self.out_channels,
                "kernel_size": list(self.kernel_size), "rank": self.rank, "stride": list(self.stride),
                "padding": padding, "dilation": list(self.dilation), "bias": self.bias is not None}  # fmt: skip

    def dense_weight_shape(self) -> tuple[int, ...]:
        return (self.out_channels, self.in_channels, *self.kernel_size)

    _hidden_dim = -3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = F.conv2d(x, self.first, None, self.stride, self.padding, self.dilation)
        if self.statistics is not None:
            self._observe(x, hidden)
        second = self.second.reshape(*self.second.shape, 1, 1)
        return F.conv2d(self._masked(hidden, -3), second, self.bias)

    def _input_rows(self, x: torch.Tensor) -> torch.Tensor:
        """The input patches the kernel sees (``unfold``), one row per output position: ``[count, in * kh * kw]``."""
        x = x.detach()
        if x.dim() == 3:
            x = x.unsqueeze(0)
        padding: tuple[int, ...] | str = self.padding
        if isinstance(padding, str):
            if padding == "same":  # PyTorch pads the odd remainder on the right/bottom
                total = [d * (k - 1) for d, k in zip(self.dilation, self.kernel_size, strict=True)]
                x = F.pad(x, (total[1] // 2, total[1] - total[1] // 2, total[0] // 2, total[0] - total[0] // 2))
            padding = (0, 0)
        patches = F.unfold(x, self.kernel_size, self.dilation, padding, self.stride)  # [N, n, positions]
        return patches.transpose(1, 2).reshape(-1, patches.shape[1])

    def _dense_skeleton(self) -> nn.Module:
        return nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                         self.dilation, bias=self.bias is not None)  # fmt: skip

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, rank={self.rank},"
            f" active_rank={self._active}, stride={self.stride}, padding={self.padding}, dilation={self.dilation},"
            f" bias={self.bias is not None}"
        )


class LowRankConv1D(LowRankLinear):
    """transformers' ``Conv1D`` (``y = x @ W + b``, ``W`` stored ``(in, out)``; GPT-2's attention and MLP) as factors.

    It computes as a :class:`LowRankLinear`; ``weight`` is ``(in, out)`` and ``nf`` (outputs) / ``nx`` (inputs) are
    there, as on the Conv1D, so code written for Conv1D keeps working. Its ``rebuild_args`` are LowRankLinear's.
    """

    _transposed_weight = True

    @classmethod
    def from_conv1d(cls, conv1d: nn.Module, rank: int | None = None) -> tuple[LowRankConv1D, torch.Tensor]:
        """The full-rank factorisation of a transformers ``Conv1D`` (``rank``: truncated to it) and its singular
        values. Gathers under ZeRO-3."""
        if not weight_is_transposed(conv1d):
            raise TypeError(
                f"`conv1d` must be a transformers.pytorch_utils.Conv1D, got {type(conv1d).__name__}."
                " HINT: factorise_layer(layer) picks the constructor for any supported layer."
            )
        return cls._from_dense(conv1d, rank)

    @property
    def nf(self) -> int:
        return self.out_features

    @property
    def nx(self) -> int:
        return self.in_features

    def _dense_skeleton(self) -> nn.Module:
        from transformers.pytorch_utils import Conv1D  # only here: a LowRankConv1D needs transformers back

        return Conv1D(self.out_features, self.in_features)

    def extra_repr(self) -> str:
        return f"nf={self.nf}, nx={self.nx}, " + super().extra_repr()
