"""The dense baseline: what the model cost before any technique changed it, measured once and checkpointed.

The monitor reports every ``*_dense`` figure (``compress/params_dense``, ``bytes_dense``, ``flops_dense``,
``latency_ms_dense``) and the W&B summary's ``compress/dense/*`` from one :class:`DenseBaseline`, so they describe
the same dense model at every step, whatever the callback order, and after a resume (the baseline is part of the
monitor's callback state, and restored values win over measuring again).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from torch import nn

from lightning_compress.monitor.measure import LayerReport, ModelReport, compression_ratio, measure_model
from lightning_compress.protocol import DescribesCompression, LayerFigures


@dataclass
class DenseBaseline:
    """The dense model's figures.

    ``report`` is its structure (parameters, non-zeros, bytes), measured when the baseline is captured, without FLOPs.
    ``flops`` are the dense FLOPs of one forward of the inputs whose :meth:`ForwardCall.signature` is
    ``flops_inputs``; ``latency_ms`` the dense model's measured forward time. Both need inputs, so both are filled
    in later (see ``CompressionMonitor``); either stays None when it could not be measured.
    """

    report: ModelReport
    flops: int | None = None
    flops_inputs: str | None = None
    latency_ms: float | None = None

    def applied_to(self, metrics: Mapping[str, float]) -> dict[str, float]:
        """``metrics`` (a report's) with its ``*_dense`` figures and compression ratio taken from this baseline; FLOPs
        only where ``metrics`` has FLOPs, so dense and effective FLOPs are logged together."""
        applied = dict(metrics)
        applied["compress/params_dense"] = float(self.report.params_dense)
        applied["compress/bytes_dense"] = float(self.report.bytes_dense)
        if "compress/bytes_compressed" in applied:
            applied["compress/compression_ratio"] = compression_ratio(
                self.report.bytes_dense, applied["compress/bytes_compressed"]
            )
        if self.flops is not None and "compress/flops_effective" in applied:
            applied["compress/flops_dense"] = float(self.flops)
        if self.latency_ms is not None:
            applied["compress/latency_ms_dense"] = self.latency_ms
        return applied

    def summary(self) -> dict[str, float]:
        """Every figure of the dense model: its structure, and its FLOPs and latency where measured."""
        summary = self.applied_to(self.report.metrics())
        if self.flops is not None:
            summary["compress/flops_dense"] = float(self.flops)
        return summary

    def state_dict(self) -> dict[str, Any]:
        """Plain containers and numbers only (a checkpoint loaded with ``weights_only=True`` keeps them)."""
        return asdict(self)

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> DenseBaseline:
        report = dict(state["report"])
        report["layers"] = tuple(
            LayerReport(**{**layer, "figures": LayerFigures(**layer["figures"])}) for layer in report["layers"]
        )
        return cls(ModelReport(**report), state["flops"], state["flops_inputs"], state["latency_ms"])


def capture(model: nn.Module) -> DenseBaseline:
    """The baseline's structure, measured now (collective under ZeRO-3). Swapped layers already present are counted
    by their own description of the dense layer they replace (``measure_model``'s dense rule)."""
    return DenseBaseline(measure_model(model))


def holds_swapped_layers(model: nn.Module) -> bool:
    """Whether a technique has already replaced a layer of ``model`` (a layer that describes its compression)."""
    return any(isinstance(module, DescribesCompression) for module in model.modules())
