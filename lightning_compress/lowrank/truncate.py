"""Truncation at fit end: each factorised layer becomes its physically smaller copy, or dense again when that saves
too little."""

from __future__ import annotations

import math

import torch
from torch import nn

from lightning_compress._lightning import rank_zero_info
from lightning_compress.lowrank.factorised import _Factorised
from lightning_compress.lowrank.ranks import LayerSpectrum


def truncate_factorised(model: nn.Module, min_saving: float, layers: dict[str, _Factorised]) -> dict[str, _Factorised]:
    """Replace every factorised layer of ``model`` by its truncated copy (active components only), or by the dense
    layer it computes when its active components would not be ``min_saving`` smaller; ``layers`` (by name) updated
    to the new layers, without the ones made dense."""
    layers = dict(layers)
    for name, module in list(model.named_modules()):
        if not isinstance(module, _Factorised):
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        shape = module.dense_weight_shape()
        spectrum = LayerSpectrum(name, shape[0], math.prod(shape[1:]), torch.empty(0))
        if module.active_rank > spectrum.max_useful_rank(min_saving):
            rank_zero_info(
                f"LowRankRefactoring: {name} is made dense again: {module.active_rank} active components hold"
                f" {spectrum.params_at(module.active_rank):,} weights against {spectrum.dense_params:,} dense."
            )
            setattr(parent, child, module.to_dense())
            layers.pop(name, None)
            continue
        setattr(parent, child, module.truncated())
        if name in layers:
            layers[name] = getattr(parent, child)
    return layers
