"""Rank selection: how many singular directions each layer keeps, from a ratio, an energy or a global budget.

Pure functions of singular values and layer shapes. A layer of shape ``[out, in]`` (a convolution is read as
``[out, in/groups * kh * kw]``) factorised at rank ``r`` holds ``r * (out + in)`` weights instead of ``out * in``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LayerSpectrum:
    """A layer's name, its matrix shape ``(out, in)`` and its singular values (descending)."""

    name: str
    out_features: int
    in_features: int
    singular_values: torch.Tensor

    @property
    def full_rank(self) -> int:
        return min(self.out_features, self.in_features)

    def params_at(self, rank: int) -> int:
        """Weights of the two factors at ``rank``."""
        return rank * (self.out_features + self.in_features)

    @property
    def dense_params(self) -> int:
        return self.out_features * self.in_features

    @property
    def break_even_rank(self) -> int:
        """The largest rank whose factors hold fewer weights than the dense matrix (0: none does)."""
        return (self.dense_params - 1) // (self.out_features + self.in_features)

    def max_useful_rank(self, min_saving: float) -> int:
        """The largest rank whose factors save at least ``min_saving`` of the dense weights (and at least one)."""
        cap = math.floor((1.0 - min_saving) * self.dense_params / (self.out_features + self.in_features) + 1e-9)
        return min(cap, self.break_even_rank)


def rank_for_ratio(spectrum: LayerSpectrum, rank_ratio: float) -> int:
    """``ceil(rank_ratio * full rank)``, at least 1 (a product a rounding error above an integer is that integer)."""
    return max(1, math.ceil(rank_ratio * spectrum.full_rank - 1e-9))


def rank_for_energy(spectrum: LayerSpectrum, energy: float) -> int:
    """The smallest rank whose singular values hold ``energy`` of the sum of squares (at least 1)."""
    squares = spectrum.singular_values.double().square()
    total = float(squares.sum())
    if total == 0.0:
        return 1
    cumulative = torch.cumsum(squares, 0) / total
    return max(1, int(torch.searchsorted(cumulative, torch.tensor(energy, dtype=torch.float64) - 1e-12)) + 1)


def ranks_for_budget(spectra: list[LayerSpectrum], param_budget: float, min_saving: float = 0.0) -> dict[str, int]:
    """Ranks across layers keeping at most ``param_budget`` of the layers' dense weights, chosen by energy per weight.

    Layers that no rank makes ``min_saving`` smaller (``max_useful_rank`` 0) stay dense and spend their dense weights;
    the others start at rank 1, and the next singular direction taken is the one (over all layers) with the most
    squared singular value (relative to its layer's total) per weight it costs, up to each layer's
    ``max_useful_rank``, until the budget is spent. The relative scale makes layers of different magnitudes
    comparable. Returns the ranks of the layers to factorise; raises ValueError when even rank 1 everywhere exceeds
    the budget.
    """
    dense = sum(s.dense_params for s in spectra)
    budget = param_budget * dense
    factorisable = [s for s in spectra if s.max_useful_rank(min_saving) >= 1]
    ranks = {s.name: 1 for s in factorisable}
    kept_dense = sum(s.dense_params for s in spectra if s.max_useful_rank(min_saving) < 1)
    spent = sum(s.params_at(1) for s in factorisable) + kept_dense
    if spent > budget or not factorisable:
        raise ValueError(
            f"`param_budget`={param_budget} allows {int(budget):,} weights, but rank 1 in every targeted layer already"
            f" needs {spent:,} (of {dense:,} dense). HINT: raise the budget or target fewer layers."
        )
    candidates = []
    for s in factorisable:
        squares = s.singular_values.double().square()
        total = float(squares.sum()) or 1.0
        cost = s.out_features + s.in_features
        for index in range(1, s.max_useful_rank(min_saving)):
            candidates.append((float(squares[index]) / total / cost, s.name, index, cost))
    candidates.sort(key=lambda c: -c[0])  # singular values descend, so each layer's directions stay in order
    for _score, name, index, cost in candidates:
        if ranks[name] == index and spent + cost <= budget:
            ranks[name] += 1
            spent += cost
    return ranks
