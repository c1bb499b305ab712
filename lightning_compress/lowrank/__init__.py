"""Low-rank refactoring: SVD factorised layers, rank selection, and the LowRankRefactoring callback."""

from lightning_compress.lowrank.callback import LowRankRefactoring
from lightning_compress.lowrank.layers import (
    LowRankConv1D,
    LowRankConv2d,
    LowRankLinear,
    factor,
    factorise_layer,
    weight_matrix,
)
from lightning_compress.lowrank.ranks import LayerSpectrum, rank_for_energy, rank_for_ratio, ranks_for_budget

__all__ = [
    "LayerSpectrum",
    "LowRankConv1D",
    "LowRankConv2d",
    "LowRankLinear",
    "LowRankRefactoring",
    "factor",
    "factorise_layer",
    "rank_for_energy",
    "rank_for_ratio",
    "ranks_for_budget",
    "weight_matrix",
]
