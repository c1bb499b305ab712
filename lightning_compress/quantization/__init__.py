"""Quantization-aware training: specs and fake quantization (STE), observers, QAT layers, the callback, and the
convert to int8 layers that run integer kernels."""

from lightning_compress.quantization.callback import QuantizationAwareTraining
from lightning_compress.quantization.conv1d import Int8Conv1D, QATConv1D
from lightning_compress.quantization.convert import convert_to_int8
from lightning_compress.quantization.fake_quant import (
    QuantSpec,
    dequantize,
    fake_quantize,
    qrange,
    quantize,
    scale_zero_point,
)
from lightning_compress.quantization.int8 import Int8Conv1d, Int8Conv2d, Int8Linear
from lightning_compress.quantization.layers import QATConv1d, QATConv2d, QATLinear
from lightning_compress.quantization.observers import MinMaxObserver, MovingAverageObserver

__all__ = [
    "Int8Conv1D",
    "Int8Conv1d",
    "Int8Conv2d",
    "Int8Linear",
    "MinMaxObserver",
    "MovingAverageObserver",
    "QATConv1D",
    "QATConv1d",
    "QATConv2d",
    "QATLinear",
    "QuantSpec",
    "QuantizationAwareTraining",
    "convert_to_int8",
    "dequantize",
    "fake_quantize",
    "qrange",
    "quantize",
    "scale_zero_point",
]
