"""convert_to_int8: a QAT-trained model -> the same model with int8 layers that run integer kernels."""

from __future__ import annotations

import copy

import torch
from torch import nn

from lightning_compress.distributed import is_zero3_partitioned
from lightning_compress.quantization.int8 import Int8Conv1d, Int8Conv2d, Int8Linear
from lightning_compress.quantization.layers import QATConv1d, QATConv2d, QATLinear, _QATBase

__all__ = ["convert_to_int8"]

_INT8_TYPE: dict[type[nn.Module], type[nn.Module]] = {
    QATLinear: Int8Linear,
    QATConv1d: Int8Conv1d,
    QATConv2d: Int8Conv2d,
}


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
    layers = {name: m for name, m in model.named_modules() if isinstance(m, _QATBase)}
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
        layer = getattr(parent, child)
        int8 = _INT8_TYPE[type(layer)].from_qat(layer)
        setattr(parent, child, int8.to(layer.weight.device))
    return target.eval()


def _check_convertible(name: str, layer: _QATBase) -> None:
    if type(layer) not in _INT8_TYPE:
        raise ValueError(f"layer {name!r} is a {type(layer).__name__}, which has no int8 form.")
    if is_zero3_partitioned(layer.weight):
        raise ValueError(
            f"layer {name!r} holds a ZeRO-3 partitioned weight, which cannot be converted in place. HINT: rebuild the"
            " model from the consolidated checkpoint (DeepSpeed's get_fp32_state_dict_from_zero_checkpoint), then"
            " convert it."
        )
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
    if "_metric_attributes" in clone.__dict__:  # Lightning's cache maps id(metric) -> name: the ids are the old ones
        clone.__dict__["_metric_attributes"] = None
    return clone
