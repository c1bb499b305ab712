"""Savings, measured: parameters, non-zeros, bytes, FLOPs, latency, memory, logged to every logger."""

from lightning_compress.monitor.callback import CompressionMonitor
from lightning_compress.monitor.measure import ModelReport, measure_model

__all__ = ["CompressionMonitor", "ModelReport", "measure_model"]
