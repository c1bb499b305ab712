"""Rebasing one factorised layer on its activation-whitened SVD while training (the math is in ``whitening.py``).

The layer keeps computing what it computed; its factors, DeepSpeed's fp32 master copies of them and the optimizer's
moment estimates all move into the new basis together. Collective under ZeRO-3: every rank rebases every layer, in
the same order.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from lightning_compress import distributed
from lightning_compress.lowrank.factorised import _Factorised
from lightning_compress.lowrank.ranks import LayerSpectrum
from lightning_compress.lowrank.statistics import LayerStatistics
from lightning_compress.lowrank.whitening import carry_state, whitened_factors


@dataclass
class LayerRebase:
    """What rebasing one layer found: its spectrum in the new basis, each component's mean square on the calibration
    data (None when the layer saw no batch and stays in the weights' basis), and optimizer state it could not carry."""

    spectrum: LayerSpectrum
    energy: torch.Tensor | None
    unknown_state: set[str] = field(default_factory=set)


def rebase_layer(
    name: str, layer: _Factorised, stats: LayerStatistics | None, optimizers: Sequence[torch.optim.Optimizer]
) -> LayerRebase:
    """Rebase ``layer`` on the input second moment in ``stats`` (weights-only spectrum when it saw no input)."""
    shape = layer.dense_weight_shape()
    rows, columns = shape[0], math.prod(shape[1:])
    first0, second0 = distributed.full_training_values([layer.first, layer.second])
    if stats is None or stats.kind != "inputs" or stats.rows == 0:  # not in the forward pass: weights only
        singular = torch.linalg.svdvals(second0.double() @ first0.flatten(1).double()).float()
        return LayerRebase(LayerSpectrum(name, rows, columns, singular), None)
    moment = stats.mean()
    rebased = whitened_factors(first0.flatten(1), second0, moment.to(first0.device))
    unknown = set()
    for param, factor in ((layer.first, "first"), (layer.second, "second")):
        for key in distributed.optimizer_state_keys(optimizers, param):
            state = distributed.full_optimizer_state(optimizers, param, key)
            carried = carry_state(key, state, factor, rebased)
            if carried is None:
                unknown.add(key)
                carried = torch.zeros_like(state)
            distributed.write_optimizer_state_(optimizers, param, key, carried)
    distributed.write_full_([layer.first, layer.second], [rebased.first.reshape(first0.shape), rebased.second])
    flat = rebased.first.double()
    energy = ((flat @ moment.to(flat)) * flat).sum(1).float()  # E[h_i^2] on the calibration data
    return LayerRebase(LayerSpectrum(name, rows, columns, rebased.singular_values), energy, unknown)
