"""Observers: modules that watch a tensor's range and turn it into a scale and zero point.

Every statistic, and the ``enabled`` flag, is a buffer, so it is in the state dict and a resumed run continues
exactly. Updates are written with ``torch.where`` on the flag rather than a Python ``if``, so observing never
forces a device-to-host sync. Until an observer has seen data its range is empty (``+inf``/``-inf``), which
:meth:`calculate_qparams` treats as ``[0, 0]``.
"""

from __future__ import annotations

import torch
from torch import nn

from lightning_compress.quantization.fake_quant import QuantSpec, scale_zero_point


class _Observer(nn.Module):
    min_val: torch.Tensor
    max_val: torch.Tensor
    enabled: torch.Tensor

    def __init__(self, spec: QuantSpec, channels: int | None = None) -> None:
        super().__init__()
        if spec.per_channel and (not isinstance(channels, int) or isinstance(channels, bool) or channels < 1):
            raise ValueError(f"`channels` must be a positive int for a per-channel spec, got {channels!r}.")
        if not spec.per_channel and channels is not None:
            raise ValueError(f"`channels` is only for per-channel specs, got {channels!r} with `per_channel=False`.")
        self.spec = spec
        shape = (channels,) if spec.per_channel else ()
        self.register_buffer("min_val", torch.full(shape, float("inf")))
        self.register_buffer("max_val", torch.full(shape, float("-inf")))
        self.register_buffer("enabled", torch.tensor(True))

    def set_enabled(self, enabled: bool = True) -> None:
        """Start (True) or stop (False) updating the statistics; the flag is saved with them."""
        self.enabled.fill_(bool(enabled))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Update the statistics from ``x`` (when enabled) and return ``x`` unchanged."""
        with torch.no_grad():
            low, high = self._batch_range(x.detach())
            new_min, new_max = self._combine(low, high)
            self.min_val.copy_(torch.where(self.enabled, new_min, self.min_val))
            self.max_val.copy_(torch.where(self.enabled, new_max, self.max_val))
        return x

    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scale, zero_point)`` for the range seen so far (per channel for a per-channel spec)."""
        seen = torch.isfinite(self.min_val) & torch.isfinite(self.max_val)
        zero = torch.zeros_like(self.min_val)
        return scale_zero_point(torch.where(seen, self.min_val, zero), torch.where(seen, self.max_val, zero), self.spec)

    def _batch_range(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.float()
        if not self.spec.per_channel:
            return x.amin(), x.amax()
        axis = self.spec.channel_axis % x.dim()
        if x.shape[axis] != self.min_val.numel():
            raise ValueError(
                f"{type(self).__name__} expects {self.min_val.numel()} channels along dimension {axis},"
                f" got a tensor of shape {tuple(x.shape)}."
            )
        rows = x.movedim(axis, 0).reshape(x.shape[axis], -1)
        return rows.amin(dim=1), rows.amax(dim=1)

    def _combine(self, low: torch.Tensor, high: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"spec={self.spec}"


class MinMaxObserver(_Observer):
    """Running minimum and maximum over everything seen (per channel or per tensor); for weights."""

    def _combine(self, low: torch.Tensor, high: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.minimum(self.min_val, low), torch.maximum(self.max_val, high)


class MovingAverageObserver(_Observer):
    """Exponential moving average of each batch's min and max; the first batch initialises; for activations.

    ``new = old + momentum * (batch - old)``.
    """

    def __init__(self, spec: QuantSpec, channels: int | None = None, momentum: float = 0.01) -> None:
        if not isinstance(momentum, (int, float)) or isinstance(momentum, bool) or not 0.0 < momentum <= 1.0:
            raise ValueError(f"`momentum` must be a float in (0, 1], got {momentum!r}.")
        super().__init__(spec, channels)
        self.momentum = float(momentum)

    def _combine(self, low: torch.Tensor, high: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        first = ~torch.isfinite(self.min_val)
        new_min = torch.where(first, low, self.min_val + self.momentum * (low - self.min_val))
        new_max = torch.where(first, high, self.max_val + self.momentum * (high - self.max_val))
        return new_min, new_max

    def extra_repr(self) -> str:
        return f"spec={self.spec}, momentum={self.momentum}"
