"""convert_to_int8: a QAT-trained model -> the same model with int8 layers that run integer kernels."""

from __future__ import annotations

import copy
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from lightning_compress._lightning import forget_metric_names
from lightning_compress.distributed import is_zero3_partitioned
from lightning_compress.quantization.layers import _QATBase

__all__ = ["ConvertsToInt8", "convert_to_int8"]


@runtime_checkable
class ConvertsToInt8(Protocol):
    """A layer that knows its int8 inference form: the QAT layers (and their subclasses, by inheritance), or a
    user's own layer type. ``convert_to_int8`` puts ``layer.to_int8()`` in its place."""

    def to_int8(self) -> nn.Module: ...


def convert_to_int8(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Replace every QAT layer of ``model`` by its int8 inference layer; return the model in eval mode.

    The weights are quantized with the ranges the weight observers hold and the inputs with the ranges the input
    observers learned, so the result computes what the QAT model computes in eval mode. Pruned (zero) weights stay
    integer zeros. With ``inplace=False`` (default) ``model`` is left as it is and a copy is converted; a
    LightningModule's Trainer is not copied (the copy is detached from it).

    Raises ValueError when ``model`` has no QAT layer, when a layer's ranges were never observed, or when the weights
    are ZeRO-3 partitioned (convert the consolidated checkpoint instead).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}.")
    layers: dict[str, nn.Module] = {}
    for name, module in model.named_modules():  # parents first: a convertible layer converts what it holds too
        if isinstance(module, ConvertsToInt8) and not any(name.startswith(f"{outer}.") for outer in layers):
            layers[name] = module
    if not layers:
        raise ValueError(
            f"`model` ({type(model).__name__}) has no QAT layer to convert. HINT: train it with"
            " QuantizationAwareTraining(...) in the Trainer's callbacks first, then convert that model."
        )
    for name, layer in layers.items():
        _check_convertible(name, layer)
    target = model if inplace else _detached_copy(model)
    for name in layers:
        parent_name, _, child = name.rpartition(".")
        parent = target.get_submodule(parent_name) if parent_name else target
        setattr(parent, child, getattr(parent, child).to_int8())
    return target.eval()


def _check_convertible(name: str, layer: nn.Module) -> None:
    if any(is_zero3_partitioned(p) for p in layer.parameters()):
        raise ValueError(
            f"layer {name!r} holds a ZeRO-3 partitioned weight, which cannot be converted in place. HINT: rebuild the"
            " model from the consolidated checkpoint (DeepSpeed's get_fp32_state_dict_from_zero_checkpoint), then"
            " convert it."
        )
    if not isinstance(layer, _QATBase):
        return  # a user's own convertible layer checks itself in to_int8()
    observers = {"weight": layer.weight_observer, "input": layer.input_observer}
    for kind, observer in observers.items():
        if observer is not None and not bool(torch.isfinite(observer.min_val).all()):
            raise ValueError(
                f"layer {name!r} has never observed its {kind} range, so it has no scale to convert with."
                " HINT: train (or calibrate) for at least one step with QuantizationAwareTraining before converting."
            )


def _detached_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` that shares nothing with it and leaves a LightningModule's Trainer behind."""
    memo: dict[int, object] = {}
    trainer = model.__dict__.get("_trainer")
    if trainer is not None:
        memo[id(trainer)] = None
    clone = copy.deepcopy(model, memo)
    forget_metric_names(clone)  # Lightning's cache maps id(metric) -> name: the ids are the original's
    return clone
