"""Factorised layers: a Linear or Conv2d weight ``W`` ([out, in], a convolution read as [out, in * kh * kw]) held as
two factors, ``W = second @ first``, with a rank mask that switches singular directions off without changing shapes.

Factorising uses the SVD ``W = U S Vh``: ``first = sqrt(S) Vh`` and ``second = U sqrt(S)``, so at full rank the layer
computes what the dense layer computed. During training the mask shrinks the effective rank (shapes stay, so DDP and
DeepSpeed keep their parameters); :meth:`truncated` then builds a physically smaller layer from the active directions.

Convolutions: the SVD of the flattened kernel gives a ``kh x kw`` convolution into ``rank`` channels followed by a
1x1 convolution to the outputs. It is the optimal rank-``r`` approximation of the layer's matrix (Eckart-Young), uses
the same code as Linear, and runs as two ordinary convolutions on every backend; Tucker-2 would add a third
convolution for a second rank that small convolutions rarely need.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lightning_compress.distributed import full_shape, gathered
from lightning_compress.lowrank.statistics import LayerStatistics
from lightning_compress.packing import packed_nbytes
from lightning_compress.protocol import LayerFigures, LayerStorage

__all__ = ["LowRankConv2d", "LowRankLinear", "factor"]


def factor(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(first, second, singular_values)`` of a 2-D ``weight`` at full rank: ``second @ first == weight``."""
    u, s, vh = torch.linalg.svd(weight.detach().double(), full_matrices=False)
    root = s.sqrt()
    first = (root[:, None] * vh).to(weight.dtype)
    second = (u * root[None, :]).to(weight.dtype)
    return first, second, s.float()


class _Factorised(nn.Module):
    """The rank mask, the component importance and the self-description shared by the factorised layers.

    ``first`` holds one component per row (dimension 0), ``second`` one per column (dimension 1).
    """

    first: nn.Parameter
    second: nn.Parameter
    bias: nn.Parameter | None
    rank_mask: torch.Tensor

    def _init_factors(
        self, first_shape: tuple[int, ...], second_shape: tuple[int, int], bias: bool, transposed: bool = False
    ) -> None:
        """``transposed``: each factor's memory is its transpose's, row-major (shapes unchanged); see LowRankLinear."""

        def empty(shape: tuple[int, ...]) -> torch.Tensor:
            return torch.empty(shape[::-1]).t() if transposed else torch.empty(shape)

        self.first = nn.Parameter(empty(first_shape))
        self.second = nn.Parameter(empty(second_shape))
        self.bias = nn.Parameter(torch.zeros(second_shape[0])) if bias else None
        self.register_buffer("rank_mask", torch.ones(first_shape[0], dtype=torch.bool))
        self._active = first_shape[0]  # host-side count of active directions: forward skips the mask when all are
        self._multiplier: torch.Tensor | None = None
        #: Set by LowRankRefactoring while it observes the data (training-mode forwards add to it); else None.
        self.statistics: LayerStatistics | None = None
        self.register_load_state_dict_post_hook(_refresh_mask_cache)

    @property
    def rank(self) -> int:
        """Components held (the factors' inner dimension)."""
        return int(self.rank_mask.numel())

    @property
    def active_rank(self) -> int:
        """Components in use (the effective rank)."""
        return self._active

    def set_rank_mask(self, mask: torch.Tensor) -> None:
        """Use the components where ``mask`` is True."""
        self.rank_mask.copy_(mask.to(self.rank_mask.device, torch.bool))
        _refresh_mask_cache(self, None)

    def component_importance(self, hidden_energy: torch.Tensor | None = None) -> torch.Tensor:
        """Each component's contribution to the outputs, 0 for components already switched off. Collective under
        ZeRO-3.

        Without ``hidden_energy``: ``||first_i|| * ||second_i||`` (its singular value right after the SVD). With the
        mean square of each hidden component on the data (``E[h_i^2]``, ``h = first @ x``): ``||second_i|| *
        sqrt(E[h_i^2])``, the RMS of what the component adds to the outputs.
        """
        with gathered([self.first, self.second] if hidden_energy is None else [self.second]):
            second = self.second.detach().float().norm(dim=0)
            if hidden_energy is None:
                first = self.first.detach().flatten(1).float().norm(dim=1)
            else:
                first = hidden_energy.to(second.device, torch.float32).clamp_min(0).sqrt()
        return torch.where(self.rank_mask.to(second.device), first * second, torch.zeros_like(second))

    def _observe(self, inputs: torch.Tensor, hidden: torch.Tensor) -> None:
        """Feed ``statistics`` (training mode only): the layer's input rows or its hidden components' rows."""
        if self.statistics is None or not self.training:
            return
        if self.statistics.kind == "inputs":
            self.statistics.add(self._input_rows(inputs))
        else:
            self.statistics.add(hidden.detach().movedim(self._hidden_dim, -1).reshape(-1, self.rank))

    _hidden_dim = -1

    def _input_rows(self, x: torch.Tensor) -> torch.Tensor:
        """The input as the rows the flattened weight multiplies: ``[count, n]``."""
        raise NotImplementedError  # each layer class defines it

    def _masked(self, hidden: torch.Tensor, channel_dim: int) -> torch.Tensor:
        if self._active == self.rank:
            return hidden
        if (
            self._multiplier is None
            or self._multiplier.dtype != hidden.dtype
            or self._multiplier.device != hidden.device
        ):
            self._multiplier = self.rank_mask.to(device=hidden.device, dtype=hidden.dtype)
        shape = [1] * hidden.dim()
        shape[channel_dim] = -1
        return hidden * self._multiplier.reshape(shape)

    def dense_weight_shape(self) -> tuple[int, ...]:
        """The shape of the dense weight the factors replace."""
        raise NotImplementedError  # each layer class defines it

    def compression_figures(self) -> LayerFigures:
        """Effective parameters are the active components' factor weights; FLOPs scale the same way."""
        shape = self.dense_weight_shape()
        dense = math.prod(shape)
        out, per_output = shape[0], dense // shape[0]
        effective = self._active * (out + per_output)
        return LayerFigures(
            weight_shape=shape,
            params_dense=dense,
            params_effective=effective,
            bits=32,
            rank=self._active,
            flops_factor=effective / dense,
        )

    def storage(self) -> LayerStorage:
        """Dense: the weight the factors replace, at fp32. Compressed: the active factors and the bias as
        ``save_compressed`` writes them once truncated (:meth:`truncated`, done at fit end)."""
        figures = self.compression_figures()
        bias = [] if self.bias is None else [self.bias]
        with gathered(bias):
            bias_values = [b.detach() for b in bias]
            bias_params = sum(b.numel() for b in bias_values)
            bias_nonzeros = sum(int(torch.count_nonzero(b)) for b in bias_values)
            bias_bytes = sum(packed_nbytes(b) for b in bias_values)
        params = figures.params_dense + bias_params
        return LayerStorage(
            params, figures.params_effective + bias_nonzeros, 4 * params, 4 * figures.params_effective + bias_bytes
        )

    def rebuild_args(self) -> dict[str, Any]:
        raise NotImplementedError  # each layer class defines it

    def _load_factors(self, first: torch.Tensor, second: torch.Tensor, bias: torch.Tensor | None) -> None:
        with torch.no_grad():
            self.first.copy_(first.reshape(self.first.shape))
            self.second.copy_(second)
            if bias is not None:
                self.bias.copy_(bias.detach())

    def truncated(self) -> _Factorised:
        """A physically smaller copy holding only the active components (not collective: gather first)."""
        keep = self.rank_mask.nonzero().flatten()
        first, second = self.first.detach()[keep], self.second.detach()[:, keep]
        out = type(self)(**{**self.rebuild_args(), **self._truncated_args(), "rank": first.shape[0]})
        out = out.to(first.device, first.dtype)
        out._load_factors(first, second, self.bias)
        return out

    def _truncated_args(self) -> dict[str, Any]:
        """Constructor arguments the truncated (inference) copy adds to ``rebuild_args``."""
        return {}


def _refresh_mask_cache(module: nn.Module, incompatible_keys: object) -> None:
    """After a mask change or ``load_state_dict``: the host-side count and the cached multiplier follow the buffer."""
    module._active = int(module.rank_mask.sum())
    module._multiplier = None


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
    def from_linear(cls, linear: nn.Linear) -> tuple[LowRankLinear, torch.Tensor]:
        """The full-rank factorisation of ``linear`` (same outputs) and its singular values. Gathers under ZeRO-3."""
        params = [linear.weight] + ([] if linear.bias is None else [linear.bias])
        with gathered(params):
            out_features, in_features = full_shape(linear.weight)
            first, second, singular = factor(linear.weight)
            layer = cls(in_features, out_features, first.shape[0], linear.bias is not None).to(
                first.device, first.dtype
            )
            layer._load_factors(first, second, linear.bias)
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

    def to_dense(self) -> nn.Linear:
        """The dense Linear the active components compute (for a layer whose factors would save nothing)."""
        keep = self.rank_mask.nonzero().flatten()
        out = nn.Linear(self.in_features, self.out_features, self.bias is not None)
        out = out.to(self.first.device, self.first.dtype)
        with torch.no_grad():
            out.weight.copy_(self.second.detach()[:, keep] @ self.first.detach()[keep])
            if self.bias is not None:
                out.bias.copy_(self.bias.detach())
        return out

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank},"
            f" active_rank={self._active}, bias={self.bias is not None}"
        )


class LowRankConv2d(_Factorised):
    """A ``kh x kw`` convolution into ``rank`` channels (``first``), then a 1x1 convolution to the outputs
    (``second`` as ``[out, rank]``, with the bias). Zero padding, ``groups=1``."""

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
    def from_conv2d(cls, conv: nn.Conv2d) -> tuple[LowRankConv2d, torch.Tensor]:
        """The full-rank factorisation of ``conv`` (same outputs) and its singular values. Gathers under ZeRO-3."""
        if conv.groups != 1 or conv.padding_mode != "zeros":
            raise ValueError(
                f"LowRankConv2d factorises convolutions with groups=1 and zero padding; got groups={conv.groups},"
                f" padding_mode={conv.padding_mode!r}. HINT: exclude this layer."
            )
        params = [conv.weight] + ([] if conv.bias is None else [conv.bias])
        with gathered(params):
            out_channels, in_channels, *kernel = full_shape(conv.weight)
            first, second, singular = factor(conv.weight.reshape(out_channels, -1))
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

    def to_dense(self) -> nn.Conv2d:
        """The dense Conv2d the active components compute (for a layer whose factors would save nothing)."""
        keep = self.rank_mask.nonzero().flatten()
        out = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                        self.dilation, bias=self.bias is not None)  # fmt: skip
        out = out.to(self.first.device, self.first.dtype)
        with torch.no_grad():
            weight = self.second.detach()[:, keep] @ self.first.detach()[keep].flatten(1)
            out.weight.copy_(weight.reshape(out.weight.shape))
            if self.bias is not None:
                out.bias.copy_(self.bias.detach())
        return out

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, rank={self.rank},"
            f" active_rank={self._active}, stride={self.stride}, padding={self.padding}, dilation={self.dilation},"
            f" bias={self.bias is not None}"
        )
