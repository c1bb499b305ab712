"""Affine integer quantization: specs, ranges, scales, fake quantization (STE) and real quantize/dequantize.

Fake quantization computes what torch's core ops (``torch.fake_quantize_per_{tensor,channel}_affine``) compute, bit
for bit, about twice as fast on CPU; its backward is the straight-through estimator: gradient 1 where the value lands
inside the integer range, 0 where it is clamped.
:func:`quantize` / :func:`dequantize` follow the same arithmetic (``round_half_even(x * (1/scale)) + zero_point``,
clamped; then ``(q - zero_point) * scale``), so ``fake_quantize(x) == dequantize(quantize(x))`` bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

MIN_BITS, MAX_BITS = 2, 8
EPS = torch.finfo(torch.float32).eps


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor is quantized.

    ``bits``: integer width, 2..8. ``symmetric``: zero point 0 and range ``-(2^(b-1)-1)..2^(b-1)-1`` (else unsigned
    ``0..2^b-1`` with a zero point). ``per_channel``: one scale per slice along ``channel_axis`` (else one scale).
    """

    bits: int = 8
    symmetric: bool = True
    per_channel: bool = False
    channel_axis: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or isinstance(self.bits, bool) or not MIN_BITS <= self.bits <= MAX_BITS:
            raise ValueError(
                f"`bits` must be an int from {MIN_BITS} to {MAX_BITS}, got {self.bits!r}."
                " HINT: 8 for int8 export; 4 or fewer for weight-only experiments."
            )
        for name in ("symmetric", "per_channel"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise ValueError(f"`{name}` must be True or False, got {value!r}.")
        if not isinstance(self.channel_axis, int) or isinstance(self.channel_axis, bool):
            raise ValueError(
                f"`channel_axis` must be an int (the dimension of the channels), got {self.channel_axis!r}."
            )


def qrange(spec: QuantSpec) -> tuple[int, int]:
    """The integer range ``(qmin, qmax)``: symmetric int8 is -127..127 (zero exact, range symmetric); else 0..255."""
    if spec.symmetric:
        qmax = 2 ** (spec.bits - 1) - 1
        return -qmax, qmax
    return 0, 2**spec.bits - 1


def scale_zero_point(
    min_val: torch.Tensor | float, max_val: torch.Tensor | float, spec: QuantSpec
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (float32) and zero point (int32) covering ``[min_val, max_val]`` widened to include 0.

    Element-wise, so per-channel statistics give per-channel parameters. A zero range gets scale ``EPS``.
    """
    min_val = torch.clamp(torch.as_tensor(min_val, dtype=torch.float32), max=0.0)
    max_val = torch.clamp(torch.as_tensor(max_val, dtype=torch.float32), min=0.0)
    qmin, qmax = qrange(spec)
    if spec.symmetric:
        scale = torch.clamp(torch.maximum(-min_val, max_val) / qmax, min=EPS)
        return scale, torch.zeros_like(scale, dtype=torch.int32)
    scale = torch.clamp((max_val - min_val) / (qmax - qmin), min=EPS)
    zero_point = torch.clamp(qmin - torch.round(min_val / scale), qmin, qmax).to(torch.int32)
    return scale, zero_point


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Quantize-dequantize ``x`` in float with straight-through gradients (1 inside the range, 0 where clamped)."""
    qmin, qmax = qrange(spec)
    values = x if x.dtype == torch.float32 else x.float()
    axis = spec.channel_axis if spec.per_channel else None
    scale = _along(scale.to(device=x.device, dtype=torch.float32), values, axis)
    zero_point = _along(zero_point.to(device=x.device, dtype=torch.float32), values, axis)
    out = _FakeQuantize.apply(values, scale, zero_point, qmin, qmax)
    return out if out.dtype == x.dtype else out.to(x.dtype)


class _FakeQuantize(torch.autograd.Function):
    """torch's ``fake_quantize_per_{tensor,channel}_affine`` arithmetic (bit for bit: ``x * (1 / scale)`` rounded
    half to even, plus the zero point, clamped, minus it, times the scale) in plain tensor ops, which run about twice
    as fast on CPU as those ops' kernels; the gradient is 1 where the value lands inside the range, else 0."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int):
        q = torch.round(x * (1.0 / scale)).add_(zero_point)
        clamped = (q < qmin).logical_or_(q > qmax)
        ctx.save_for_backward(clamped)
        return q.clamp_(qmin, qmax).sub_(zero_point).mul_(scale)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (clamped,) = ctx.saved_tensors
        return grad.masked_fill(clamped, 0.0), None, None, None, None


def learnable_fake_quantize(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, spec: QuantSpec, grad_factor: float
) -> torch.Tensor:
    """Fake quantization whose ``scale`` (a Parameter) learns too: LSQ (Esser et al., 2020), with the gradient of the
    scale multiplied by ``grad_factor`` (LSQ uses ``1 / sqrt(elements per scale * qmax)``). Same forward values as
    :func:`fake_quantize` for the same scale; ``zero_point`` is a float tensor and is not learned."""
    qmin, qmax = qrange(spec)
    values = x if x.dtype == torch.float32 else x.float()
    scale = scale.to(device=x.device, dtype=torch.float32).clamp(min=EPS)
    zero_point = zero_point.to(device=x.device, dtype=torch.float32)
    if spec.per_channel:
        axis = spec.channel_axis % x.dim()
        scale = scale.reshape(-1)
        zero_point = zero_point.reshape(-1).expand(scale.numel()).contiguous()
        out = torch._fake_quantize_learnable_per_channel_affine(
            values, scale, zero_point, axis, qmin, qmax, grad_factor
        )
    else:
        out = torch._fake_quantize_learnable_per_tensor_affine(
            values, scale.reshape(1), zero_point.reshape(1), qmin, qmax, grad_factor
        )
    return out if out.dtype == x.dtype else out.to(x.dtype)


def quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Integer values of ``x``: int8 for symmetric specs, uint8 for asymmetric ones."""
    qmin, qmax = qrange(spec)
    axis = spec.channel_axis if spec.per_channel else None
    scale = _along(scale.to(device=x.device, dtype=torch.float32), x, axis)
    zero_point = _along(zero_point.to(device=x.device, dtype=torch.float32), x, axis)
    q = torch.clamp(torch.round(x.detach().float() * (1.0 / scale)) + zero_point, qmin, qmax)
    return q.to(torch.int8 if spec.symmetric else torch.uint8)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, channel_axis: int = 0) -> torch.Tensor:
    """Float32 values ``(q - zero_point) * scale``; a scale of more than one element is laid along ``channel_axis``."""
    axis = channel_axis if scale.numel() > 1 else None
    scale = _along(scale.to(device=q.device, dtype=torch.float32), q, axis)
    zero_point = _along(zero_point.to(device=q.device, dtype=torch.float32), q, axis)
    return (q.float() - zero_point) * scale


def _along(values: torch.Tensor, like: torch.Tensor, axis: int | None) -> torch.Tensor:
    """``values`` shaped to broadcast against ``like``: a scalar, or a vector along dimension ``axis``."""
    if axis is None:
        return values.reshape(())
    shape = [1] * like.dim()
    shape[axis % like.dim()] = -1
    return values.reshape(shape)
