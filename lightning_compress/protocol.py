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
