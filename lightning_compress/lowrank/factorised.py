"""What every factorised layer shares: the weight ``W`` ([out, in], a convolution read as [out, in * kh * kw]) held as
two factors, ``W = second @ first``, a rank mask that switches singular directions off without changing shapes, the
dense ``weight`` they stand for, and the layer's self-description for the monitor and the exporter.

Factorising uses the SVD ``W = U S Vh``: ``first = sqrt(S) Vh`` and ``second = U sqrt(S)``, so at full rank the layer
computes what the dense layer computed. During training the mask shrinks the effective rank (shapes stay, so DDP and
DeepSpeed keep their parameters); :meth:`truncated` then builds a physically smaller layer from the active directions.
The concrete layers are in ``layers.py``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from lightning_compress.distributed import full_shape, gathered
from lightning_compress.lowrank.dense_view import dense_view
from lightning_compress.lowrank.statistics import LayerStatistics
from lightning_compress.packing import packed_nbytes
from lightning_compress.protocol import LayerFigures, LayerStorage

__all__ = ["factor"]


def factor(weight: torch.Tensor, rank: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(first, second, singular_values)`` of a 2-D ``weight``: at full rank ``second @ first == weight``; with
    ``rank``, its ``rank`` leading singular directions (the best approximation of that rank, Eckart-Young). The
    singular values are all of them."""
    u, s, vh = torch.linalg.svd(weight.detach().double(), full_matrices=False)
    keep = s.numel() if rank is None else rank
    root = s[:keep].sqrt()
    first = (root[:, None] * vh[:keep]).to(weight.dtype)
    second = (u[:, :keep] * root[None, :]).to(weight.dtype)
    return first, second, s.float()


class _Factorised(nn.Module):
    """The rank mask, the component importance and the self-description shared by the factorised layers.

    ``first`` holds one component per row (dimension 0), ``second`` one per column (dimension 1).
    """

    first: nn.Parameter
    second: nn.Parameter
    bias: nn.Parameter | None
    rank_mask: torch.Tensor
    #: ``weight`` is ``(in, out)``, the layout of transformers' Conv1D, instead of ``dense_weight_shape()``.
    _transposed_weight = False

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

    @property
    def weight(self) -> torch.Tensor:
        """The dense weight the active components stand for, shaped, typed and placed as the replaced layer's
        weight (``lowrank.dense_view``): reading its metadata forms nothing; computing with it forms
        :meth:`dense_weight` (differentiably), at each use. Read-only. Under ``torch.compile``: :meth:`dense_weight`."""
        if torch.compiler.is_compiling():
            return self.dense_weight()
        shape = self.dense_weight_shape()
        shape = shape[::-1] if self._transposed_weight else shape
        requires_grad = self.first.requires_grad or self.second.requires_grad
        return dense_view(self, shape, self.first.dtype, self.first.device, requires_grad)

    def dense_weight(self) -> torch.Tensor:
        """``second @ first`` over the active components, in ``weight``'s shape (differentiable). Needs the factors'
        full values: under ZeRO-3, inside forward or a ``lightning_compress.distributed.gathered`` block."""
        for name, param in (("first", self.first), ("second", self.second)):
            if param.shape != full_shape(param):
                raise RuntimeError(
                    f"`{type(self).__name__}.weight` needs the full factors, but ZeRO-3 holds `{name}` partitioned here"
                    f" (local shape {tuple(param.shape)}, full {tuple(full_shape(param))}). HINT: read it inside"
                    " forward, or in `with lightning_compress.distributed.gathered([layer.first, layer.second]):`"
                    " on every rank; `.dtype`, `.device` and `.shape` work anywhere."
                )
        first, second = self.first.flatten(1), self.second
        if self._active != self.rank:
            keep = self.rank_mask.nonzero().flatten()
            first, second = first[keep], second[:, keep]
        dense = (second @ first).reshape(self.dense_weight_shape())
        return dense.t() if self._transposed_weight else dense

    def to_dense(self) -> nn.Module:
        """The dense layer (of the type this one replaced) that the active components compute: for a layer whose
        factors would save nothing."""
        out = self._dense_skeleton().to(self.first.device, self.first.dtype)
        with torch.no_grad():
            out.weight.copy_(self.dense_weight())
            if self.bias is not None:
                out.bias.copy_(self.bias.detach())
            elif out.bias is not None:  # a Conv1D always has one
                out.bias.zero_()
        return out

    def _dense_skeleton(self) -> nn.Module:
        raise NotImplementedError  # each layer class defines it

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
