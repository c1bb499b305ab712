"""Pruning: scoring (scoring.py) apart from patterns (patterns.py) apart from the schedule-driven callback."""

from lightning_compress.pruning.callback import GradualPruning
from lightning_compress.pruning.patterns import Pattern

__all__ = ["GradualPruning", "Pattern"]
