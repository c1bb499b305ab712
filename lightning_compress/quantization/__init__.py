"""Quantization-aware training primitives: specs and fake quantization (STE), observers, QAT layers."""

from lightning_compress.quantization.fake_quant import (
    QuantSpec,
    dequantize,
    fake_quantize,
    qrange,
    quantize,
    scale_zero_point,
)
from lightning_compress.quantization.layers import QATConv2d, QATLinear
from lightning_compress.quantization.observers import MinMaxObserver, MovingAverageObserver

__all__ = [
    "MinMaxObserver",
    "MovingAverageObserver",
    "QATConv2d",
    "QATLinear",
    "QuantSpec",
    "dequantize",
    "fake_quantize",
    "qrange",
    "quantize",
    "scale_zero_point",
]
