"""Measuring a model: parameters, non-zeros, bytes, FLOPs (theoretical), latency and peak memory (measured).

FLOPs rule (theoretical, labelled as such everywhere they are logged): one forward pass of ``example_input`` (an
``example_input_array``, or a :class:`~lightning_compress.monitor.inputs.ForwardCall`, which may call a submodule) is
counted by ``torch.utils.flop_counter.FlopCounterMode`` (matmuls, convolutions, attention). A measured layer's dense
FLOPs come from the shape of the dense weight it computes with or stands for (``protocol.dense_weight_shape``): a 2-D
weight (Linear ``[out, in]``, or transformers' ``Conv1D`` ``[in, out]``) costs ``2 x in x out`` per row of the
output, a convolution ``[out, in/groups, *kernel]`` ``2 x in/groups x kernel size`` per output element. Its effective
FLOPs are that times the layer's own ``flops_factor`` (a masked layer: its weight density). A compressed layer is read
through ``lightning_compress.protocol`` alone.
Bytes: dense = every tensor of the state dict at fp32 (other dtypes at their size); compressed = what
``save_compressed`` writes for the tensor data (``packing.packed_nbytes``), without the small manifest. A quantized
layer (``protocol.ReportsStorage``) reports its own figures: a QAT layer that fake-quantizes counts as the int8 layer
it converts to (so the bytes fall when quantization starts), and an int8 layer counts its weight at fp32 as dense. A
compressed layer that describes itself but reports no storage counts, as dense, the weight its description states
(``params_dense``) plus its bias, at fp32; its own tensors count as compressed. So the dense figures describe the
dense model whether or not its layers were swapped already.
"""

from __future__ import annotations

import math
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

from lightning_compress.distributed import full_shape, gathered
from lightning_compress.monitor.inputs import ForwardCall, device_of
from lightning_compress.protocol import (
    DescribesCompression,
    LayerFigures,
    LayerStorage,
    ReportsStorage,
    dense_weight_shape,
    describe,
    is_measured_layer,
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
            "compress/compression_ratio": compression_ratio(self.bytes_dense, self.bytes_compressed),
        }
        if self.flops_dense is not None and self.flops_effective is not None:
            metrics["compress/flops_dense"] = float(self.flops_dense)
            metrics["compress/flops_effective"] = float(self.flops_effective)
        return metrics


def compression_ratio(bytes_dense: float, bytes_compressed: float) -> float:
    """Dense bytes over compressed bytes (1.0 when nothing is stored)."""
    return bytes_dense / bytes_compressed if bytes_compressed else 1.0


def measure_model(model: nn.Module, example_input: Any = None) -> ModelReport:
    """Measure ``model`` (collective under ZeRO-3: every rank must call it)."""
    from lightning_compress.packing import packed_nbytes

    counted = count_flops(model, example_input) if example_input is not None else None
    layer_flops = counted.dense if counted is not None else {}
    layers = []
    params_dense = params_effective = bytes_dense = bytes_compressed = 0
    reported: set[int] = set()  # tensors of layers that report their own storage
    for name, module in _outermost_layers(model):
        figures = describe(module)
        if figures is None:
            continue
        if isinstance(module, (ReportsStorage, DescribesCompression)):
            storage = module.storage() if isinstance(module, ReportsStorage) else _described_storage(module, figures)
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


def _described_storage(module: nn.Module, figures: LayerFigures) -> LayerStorage:
    """A compressed layer without ``storage()``: dense, the weight its description states plus its bias, at fp32;
    effective and compressed, its own tensors (their non-zeros; what ``save_compressed`` writes for them)."""
    from lightning_compress.packing import packed_nbytes

    bias = getattr(module, "bias", None)
    params_dense = figures.params_dense + (math.prod(full_shape(bias)) if isinstance(bias, torch.Tensor) else 0)
    params = list(module.parameters())
    with gathered(params):
        nonzeros = sum(int(torch.count_nonzero(p.detach())) for p in params)
        packed = sum(packed_nbytes(t.detach()) for t in (*params, *module.buffers()))
    return LayerStorage(params_dense, nonzeros, 4 * params_dense, packed)


@dataclass(frozen=True)
class FlopCount:
    """One forward pass: ``total`` FLOPs counted, and per measured layer (by qualified name) its ``dense`` FLOPs
    (what the dense layer would cost) and the FLOPs ``executed`` inside it (factors at full rank, fake quantization's
    float matmul; 0 for integer kernels, which the counter does not see)."""

    total: int
    dense: dict[str, int]
    executed: dict[str, int]


def count_flops(model: nn.Module, example_input: Any) -> FlopCount:
    """Count one forward pass of ``example_input`` (see :class:`FlopCount`; names are qualified in ``model`` also when
    the call goes to a submodule, whose layers alone then run)."""
    call = ForwardCall.of(example_input)
    per_layer: dict[str, int] = {}

    def hook(name: str) -> Callable[..., None]:
        def record(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> None:
            per_layer[name] = per_layer.get(name, 0) + _dense_flops(module, output)

        return record

    handles = [
        module.register_forward_hook(hook(name))
        for name, module in _outermost_layers(model)
        if is_measured_layer(module) or isinstance(module, DescribesCompression)
    ]
    try:
        with FlopCounterMode(display=False) as counter, _inference(model):
            call.run(model)
    finally:
        for handle in handles:
            handle.remove()
    by_module = counter.get_flop_counts()  # keyed "<class name of the module called>.<qualified name inside it>"
    root, prefix = type(call.target(model)).__name__, f"{call.module}." if call.module else ""
    executed = {name: int(sum(by_module.get(f"{root}.{name.removeprefix(prefix)}", {}).values())) for name in per_layer}
    return FlopCount(int(counter.get_total_flops()), per_layer, executed)


def measure_latency_ms(model: nn.Module, example_input: Any, repeats: int = 20, warmup: int = 3) -> float:
    """Median wall time of one forward pass of ``example_input`` in eval mode, in milliseconds (measured)."""
    call = ForwardCall.of(example_input)
    device = device_of(call.target(model))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    with _inference(model):
        for i in range(warmup + repeats):
            sync()
            start = time.perf_counter()
            call.run(model)
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
    """Call ``model`` the way Lightning's ``example_input_array`` convention says (tuple = args, dict = kwargs), or
    make the :class:`~lightning_compress.monitor.inputs.ForwardCall` given."""
    return ForwardCall.of(example_input).run(model)


def _dense_flops(module: nn.Module, output: Any) -> int:
    """2 multiply-adds per weight an output element reads, from the dense weight's shape (see the module docstring):
    a 2-D weight, in either orientation, costs ``2 x its size`` per output row (the features are the output's last
    dimension); a convolution weight ``[out, in/groups, *kernel]`` costs ``2 x prod(shape[1:])`` per output element.
    Quantized or factorised layers: of the dense weight they stand for."""
    if not isinstance(output, torch.Tensor) or output.dim() == 0:
        return 0
    shape = dense_weight_shape(module)
    if len(shape) == 2:
        rows = output.numel() // output.shape[-1] if output.shape[-1] else 0
        return 2 * math.prod(shape) * rows
    return 2 * math.prod(shape[1:]) * output.numel()


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


def _outermost_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The named submodules, without those inside a layer that describes itself (an int8 low-rank layer holds two
    int8 layers: it is measured once, as itself)."""
    chosen: list[tuple[str, nn.Module]] = []
    inside: list[str] = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(prefix) for prefix in inside):
            continue
        chosen.append((name, module))
        if isinstance(module, (DescribesCompression, ReportsStorage)):
            inside.append(f"{name}.")
    return chosen
