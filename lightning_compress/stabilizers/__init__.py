"""Stabilisers that know about compression events: gradient clipping and learning-rate warm-up."""

from lightning_compress.stabilizers.clipping import GradientClipping
from lightning_compress.stabilizers.warmup import LearningRateWarmup

__all__ = ["GradientClipping", "LearningRateWarmup"]
