"""Measuring a model: parameters, non-zeros, bytes, FLOPs (theoretical), latency and peak memory (measured).

FLOPs rule (theoretical, labelled as such everywhere they are logged): one forward pass of ``example_input`` is
counted by ``torch.utils.flop_counter.FlopCounterMode`` (matmuls, convolutions, attention); a Linear/Conv layer's
dense FLOPs are ``2 x in_features/groups x kernel size x output elements`` (a compressed layer: of the dense weight it
stands for, ``protocol.dense_weight_shape``), and its effective FLOPs are that times the layer's own ``flops_factor``
(a masked layer: its weight density). A compressed layer is read through ``lightning_compress.protocol`` alone.
Bytes: dense = every tensor of the state dict at fp32 (other dtypes at their size); compressed = what
``save_compressed`` writes for the tensor data (``packing.packed_nbytes``), without the small manifest. A quantized
layer (``protocol.ReportsStorage``) reports its own figures: a QAT layer that fake-quantizes counts as the int8 layer
it converts to (so the bytes fall when quantization starts), and an int8 layer counts its weight at fp32 as dense.
"""

from __future__ import annotations

import resource
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from lightning_compress.distributed import gathered
from lightning_compress.protocol import (
    MEASURED_LAYERS,
    DescribesCompression,
    LayerFigures,
    ReportsStorage,
    dense_weight_shape,
    describe,
)


@dataclass(frozen=True)
class LayerReport:
    name: str
    type: str
    figures: LayerFigures
    bytes_compressed: int
    flops_dense: int | None  # per forward of the example input; None without one

    @property
    def flops_effective(self) -> int | None:
        return None if self.flops_dense is None else round(self.flops_dense * self.figures.flops_factor)


@dataclass(frozen=True)
class ModelReport:
    layers: tuple[LayerReport, ...]
    params_dense: int
    params_effective: int
    bytes_dense: int
    bytes_compressed: int
    flops_dense: int | None
    flops_effective: int | None

    @property
    def weight_sparsity(self) -> float:
        """Zeros among the weights of the measured (Linear/Conv/compressed) layers."""
        dense = sum(layer.figures.params_dense for layer in self.layers)
        return 1.0 - sum(layer.figures.params_effective for layer in self.layers) / dense if dense else 0.0

    def metrics(self) -> dict[str, float]:
        """The ``compress/*`` scalars of this report."""
        metrics = {
            "compress/params_dense": float(self.params_dense),
            "compress/params_effective": float(self.params_effective),
            "compress/weight_sparsity": self.weight_sparsity,
            "compress/bytes_dense": float(self.bytes_dense),
            "compress/bytes_compressed": float(self.bytes_compressed),
            "compress/compression_ratio": self.bytes_dense / self.bytes_compressed if self.bytes_compressed else 1.0,
        }
        if self.flops_dense is not None and self.flops_effective is not None:
            metrics["compress/flops_dense"] = float(self.flops_dense)
            metrics["compress/flops_effective"] = float(self.flops_effective)
        return metrics


def measure_model(model: nn.Module, example_input: Any = None) -> ModelReport:
    """Measure ``model`` (collective under ZeRO-3: every rank must call it)."""
    from lightning_compress.packing import packed_nbytes

    counted = count_flops(model, example_input) if example_input is not None else None
    layer_flops = counted.dense if counted is not None else {}
    layers = []
    params_dense = params_effective = bytes_dense = bytes_compressed = 0
    reported: set[int] = set()  # tensors of layers that report their own storage
    for name, module in model.named_modules():
        figures = describe(module) if name else None
        if figures is None:
            continue
        if isinstance(module, ReportsStorage):
            storage = module.storage()
            packed = storage.bytes_compressed
            params_dense += storage.params_dense
            params_effective += storage.params_effective
            bytes_dense += storage.bytes_dense
            bytes_compressed += storage.bytes_compressed
            reported.update(id(t) for t in (*module.parameters(), *module.buffers()))
        else:
            own = dict(module.named_parameters(recurse=False))
            with gathered(list(own.values())):
                packed = sum(packed_nbytes(p.detach()) for p in own.values())
        layers.append(LayerReport(name, type(module).__name__, figures, packed, layer_flops.get(name)))
    for tensor in _full_tensors(model, skip=reported):
        params_dense += tensor.numel() if isinstance(tensor, nn.Parameter) else 0
        params_effective += int(torch.count_nonzero(tensor)) if isinstance(tensor, nn.Parameter) else 0
        bytes_dense += tensor.numel() * (4 if tensor.is_floating_point() else tensor.element_size())
        bytes_compressed += packed_nbytes(tensor.detach())
    flops_effective = None
    flops_total = None
    if counted is not None:  # what ran outside the measured layers, plus each layer's dense / effective FLOPs
        outside = counted.total - sum(counted.executed.get(layer.name, 0) for layer in layers)
        flops_total = outside + sum(layer.flops_dense or 0 for layer in layers)
        flops_effective = outside + sum(layer.flops_effective or 0 for layer in layers)
    return ModelReport(
        tuple(layers), params_dense, params_effective, bytes_dense, bytes_compressed, flops_total, flops_effective
    )


@dataclass(frozen=True)
class FlopCount:
    """One forward pass: ``total`` FLOPs counted, and per measured layer (by qualified name) its ``dense`` FLOPs
    (what the dense layer would cost) and the FLOPs ``executed`` inside it (factors at full rank, fake quantization's
    float matmul; 0 for integer kernels, which the counter does not see)."""

    total: int
    dense: dict[str, int]
    executed: dict[str, int]


def count_flops(model: nn.Module, example_input: Any) -> FlopCount:
    """Count one forward pass of ``example_input`` (see :class:`FlopCount`)."""
    per_layer: dict[str, int] = {}

    def hook(name: str) -> Callable[..., None]:
        def record(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> None:
            per_layer[name] = per_layer.get(name, 0) + _dense_flops(module, output)

        return record

    handles = [
        module.register_forward_hook(hook(name))
        for name, module in model.named_modules()
        if name and isinstance(module, (*MEASURED_LAYERS, DescribesCompression))
    ]
    try:
        with FlopCounterMode(display=False) as counter, _inference(model):
            run_forward(model, example_input)
    finally:
        for handle in handles:
            handle.remove()
    by_module = counter.get_flop_counts()  # keyed "<root class name>.<qualified name>"
    root = type(model).__name__
    executed = {name: int(sum(by_module.get(f"{root}.{name}", {}).values())) for name in per_layer}
    return FlopCount(int(counter.get_total_flops()), per_layer, executed)


def measure_latency_ms(model: nn.Module, example_input: Any, repeats: int = 20, warmup: int = 3) -> float:
    """Median wall time of one forward pass of ``example_input`` in eval mode, in milliseconds (measured)."""
    device = _device_of(model)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    with _inference(model):
        for i in range(warmup + repeats):
            sync()
            start = time.perf_counter()
            run_forward(model, example_input)
            sync()
            if i >= warmup:
                times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def peak_memory_mb(device: torch.device) -> tuple[float, str]:
    """(peak memory in MiB, what it is): CUDA's peak allocation on a GPU, else this process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process_peak_rss"


def run_forward(model: nn.Module, example_input: Any) -> Any:
    """Call ``model`` the way Lightning's ``example_input_array`` convention says: tuple = args, dict = kwargs."""
    example_input = _to_device(example_input, _device_of(model))
    if isinstance(example_input, tuple):
        return model(*example_input)
    if isinstance(example_input, dict):
        return model(**example_input)
    return model(example_input)


def _dense_flops(module: nn.Module, output: torch.Tensor) -> int:
    """2 multiply-adds per weight an output element reads: ``2 x in/groups x kernel size x output elements``."""
    if isinstance(module, nn.Linear):
        return 2 * module.in_features * output.numel()
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        kernel = torch.Size(module.kernel_size).numel()
        return 2 * (module.in_channels // module.groups) * kernel * output.numel()
    if isinstance(module, DescribesCompression):  # quantized, factorised...: the dense weight they stand for
        return 2 * torch.Size(dense_weight_shape(module)[1:]).numel() * output.numel()
    return 0


def _full_tensors(model: nn.Module, skip: set[int]) -> Iterator[torch.Tensor]:
    """Every parameter (full, also under ZeRO-3) and buffer of ``model`` not in ``skip`` (ids), one at a time."""
    for param in model.parameters():
        if id(param) not in skip:
            with gathered([param]):
                yield param
    yield from (buffer for buffer in model.buffers() if id(buffer) not in skip)


@contextmanager
def _inference(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _device_of(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    return torch.device("cpu")


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_to_device(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    return value
