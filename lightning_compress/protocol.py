"""How a layer describes its own compression, so the monitor and the exporter never import a technique.

A technique's layer implements :class:`DescribesCompression`. Plain ``Linear``/``Conv`` layers whose weights hold
exact zeros (what pruning leaves) are described by :func:`describe`'s default rule. FLOPs here are theoretical:
a layer's effective FLOPs are its dense FLOPs times ``flops_factor`` (for a masked layer, its weight density).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from lightning_compress.distributed import full_shape, gathered


@dataclass(frozen=True)
class LayerFigures:
    """What a layer costs compared with its dense fp32 self."""

    weight_shape: tuple[int, ...]
    params_dense: int
    params_effective: int  # non-zeros, or the sizes of the factors that replace the weight
    bits: int  # bits per stored weight value
    rank: int | None  # low-rank layers: the rank; None otherwise
    flops_factor: float  # effective FLOPs / dense FLOPs (theoretical)

    @property
    def sparsity(self) -> float:
        return 1.0 - self.params_effective / self.params_dense if self.params_dense else 0.0


@runtime_checkable
class DescribesCompression(Protocol):
    def compression_figures(self) -> LayerFigures: ...


@dataclass(frozen=True)
class LayerStorage:
    """What a layer stores, when its tensors are not simply its parameters (quantized layers: int8 weights and
    scales in buffers, or float weights that will be exported as int8). Parameters are the weight and bias alone;
    scales, zero points and observer statistics are quantization metadata, counted in bytes only."""

    params_dense: int
    params_effective: int  # non-zeros of weight and bias
    bytes_dense: int  # the weight and bias at fp32
    bytes_compressed: int  # what save_compressed writes for the layer (once converted, for a QAT layer)


@runtime_checkable
class ReportsStorage(Protocol):
    """A layer whose parameters and bytes the monitor takes from :meth:`storage` instead of its tensors (all of its
    tensors, recursively, are then left out of the model's totals). Collective under ZeRO-3."""

    def storage(self) -> LayerStorage: ...


MEASURED_LAYERS: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def describe(module: nn.Module) -> LayerFigures | None:
    """The figures of a compressed layer, or of a plain Linear/Conv by its non-zeros; None for other modules.

    Collective under ZeRO-3 for plain layers (their weight is gathered): every rank must call it.
    """
    if isinstance(module, DescribesCompression):
        return module.compression_figures()
    if not isinstance(module, MEASURED_LAYERS):
        return None
    weight = module.weight
    with gathered([weight]):
        nonzeros = int(torch.count_nonzero(weight.detach()))
    shape = tuple(full_shape(weight))
    total = int(torch.Size(shape).numel())
    return LayerFigures(
        weight_shape=shape,
        params_dense=total,
        params_effective=nonzeros,
        bits=torch.finfo(weight.dtype).bits if weight.dtype.is_floating_point else 8 * weight.element_size(),
        rank=None,
        flops_factor=nonzeros / total if total else 1.0,
    )
