"""How a layer describes its own compression, so the monitor and the exporter never import a technique.

Everything the monitor (``lightning_compress.monitor``) and the exporter (``lightning_compress.export``) ask of a
layer is one of these structural protocols: a layer answers by having the method, with no base class to inherit and
no registration, and the two readers test for it with ``isinstance(layer, Protocol)`` before they call it.

- :class:`DescribesCompression` (``compression_figures``): its parameters, bits, rank and FLOPs against dense;
- :class:`ReportsStorage` (``storage``): its parameters and bytes, when its tensors are not simply its parameters;
- :class:`HasDenseShape` (``dense_weight_shape``): the dense weight it stands for, when it stores something else;
- :class:`Rebuildable` (``rebuild_args``): the constructor arguments of its empty skeleton, for loading without one.

Plain ``Linear``/``Conv`` layers whose weights hold exact zeros (what pruning leaves) are described by
:func:`describe`'s default rule. FLOPs here are theoretical: a layer's effective FLOPs are its dense FLOPs times
``flops_factor`` (for a masked layer, its weight density).

Every member is a method: ``isinstance`` against a runtime-checkable protocol looks members up on the class from
Python 3.12 (``inspect.getattr_static``), so a data member such as ``weight`` (held in ``nn.Module._parameters``)
would not be seen there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from lightning_compress.distributed import full_shape, gathered
from lightning_compress.targeting import transformers_conv1d, weight_is_transposed


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
    """A compressed layer that states what it costs against its dense self.

    Called by the monitor (:func:`describe`, then ``measure_model``) at every measurement, and by
    ``count_flops`` to choose the layers whose FLOPs it counts. Collective under ZeRO-3 where it reads weights.
    """

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


@runtime_checkable
class HasDenseShape(Protocol):
    """A layer that stores something other than its dense weight (low-rank factors) and states that weight's shape.

    Called by the monitor while it counts FLOPs (``count_flops``, inside a forward hook, once per call of the
    layer) through :func:`dense_weight_shape`, to cost the layer as the dense layer it stands for: ``2 x
    prod(shape[1:])`` FLOPs per output element. It must be cheap and collective-free (a shape from constructor
    arguments, never a gather). A compressed layer without it must keep a ``weight`` of the dense shape (DESIGN
    principle 9: the int8 and QAT layers do).
    """

    def dense_weight_shape(self) -> tuple[int, ...]: ...


@runtime_checkable
class Rebuildable(Protocol):
    """A layer that ``load_compressed`` can build from the file alone, as ``type(layer)(**layer.rebuild_args())``.

    Called by ``save_compressed`` (on the writing rank, once per layer, after the state dict is gathered) for each
    submodule whose class is defined under ``lightning_compress.``; the arguments are recorded in the file's
    manifest. ``load_compressed`` without a skeleton rebuilds the model, puts ``cls(**args)`` at each recorded name,
    then loads the state dict, so the arguments must survive JSON and build an empty layer whose state dict has the
    saved keys, shapes and dtypes.
    """

    def rebuild_args(self) -> dict[str, Any]: ...


MEASURED_LAYERS: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
"""The plain layers measured by their weights; transformers' ``Conv1D`` too when loaded (:func:`is_measured_layer`)."""


def is_measured_layer(module: nn.Module) -> bool:
    """Whether ``module`` is a plain layer :func:`describe` measures by its weight's non-zeros."""
    conv1d = transformers_conv1d()
    return isinstance(module, MEASURED_LAYERS) or (conv1d is not None and isinstance(module, conv1d))


def _out_in_shape(module: nn.Module, weight: torch.Tensor) -> tuple[int, ...]:
    """The full weight shape as ``(out, in, *kernel)``; a Conv1D stores its weight ``(in, out)``."""
    shape = tuple(full_shape(weight))
    return shape[::-1] if weight_is_transposed(module) else shape


def describe(module: nn.Module) -> LayerFigures | None:
    """The figures of a compressed layer, or of a plain Linear/Conv by its non-zeros; None for other modules.

    Collective under ZeRO-3 for plain layers (their weight is gathered): every rank must call it.
    """
    if isinstance(module, DescribesCompression):
        return module.compression_figures()
    if not is_measured_layer(module):
        return None
    weight = module.weight
    with gathered([weight]):
        nonzeros = int(torch.count_nonzero(weight.detach()))
    shape = _out_in_shape(module, weight)
    total = int(torch.Size(shape).numel())
    return LayerFigures(
        weight_shape=shape,
        params_dense=total,
        params_effective=nonzeros,
        bits=torch.finfo(weight.dtype).bits if weight.dtype.is_floating_point else 8 * weight.element_size(),
        rank=None,
        flops_factor=nonzeros / total if total else 1.0,
    )


def dense_weight_shape(module: nn.Module) -> tuple[int, ...]:
    """The full shape of the dense weight ``module`` computes with or stands for; shapes only, never a gather.

    A :class:`HasDenseShape` layer's own answer; otherwise the full shape of its ``weight`` (also under ZeRO-3,
    where the local tensor is empty): plain layers, and compressed drop-ins that keep the dense-shaped ``weight``.
    Always ``(out, in, *kernel)``: a transformers ``Conv1D``'s ``(in, out)`` weight is read the other way round.
    """
    if isinstance(module, HasDenseShape):
        return tuple(module.dense_weight_shape())
    weight = getattr(module, "weight", None)  # a data member: no protocol can ask for it (see the module docstring)
    if not isinstance(weight, torch.Tensor):
        raise TypeError(
            f"{type(module).__name__} has neither `dense_weight_shape()` nor a `weight` tensor, so the dense layer it"
            " stands for is unknown. HINT: implement lightning_compress.protocol.HasDenseShape"
            " (def dense_weight_shape(self) -> tuple[int, ...])."
        )
    return _out_in_shape(module, weight)
