"""Low-rank refactoring: SVD factorised layers, rank selection, and the LowRankRefactoring callback."""

from lightning_compress.lowrank.callback import LowRankRefactoring
from lightning_compress.lowrank.layers import LowRankConv2d, LowRankLinear, factor
from lightning_compress.lowrank.ranks import LayerSpectrum, rank_for_energy, rank_for_ratio, ranks_for_budget

__all__ = [
    "LayerSpectrum",
    "LowRankConv2d",
    "LowRankLinear",
    "LowRankRefactoring",
    "factor",
    "rank_for_energy",
    "rank_for_ratio",
    "ranks_for_budget",
]
