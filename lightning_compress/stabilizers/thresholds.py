"""The arithmetic of clipping, apart from where gradients live: pure functions on tensors and on the norm history.

- ``norm``: scale every gradient by ``min(1, threshold / (norm + 1e-6))``, the formula of torch's
  ``clip_grad_norm_`` and of DeepSpeed's ZeRO optimizers, so the two routes clip alike.
- ``value``: clamp each element to ``[-threshold, threshold]``.
- ``agc``: adaptive gradient clipping (Brock et al. 2021, "High-Performance Large-Scale Image Recognition Without
  Normalization"): a unit's gradient (a row of a weight: one output neuron or channel) is scaled down to
  ``clip_factor * max(||w_unit||, eps)`` where it is longer; a vector (bias, norm gain) is one unit.
- ``adaptive``: the norm clip at a threshold read from the history of past global norms, AutoClip's rule (Seetharaman
  et al. 2020): the ``percentile``-th percentile of the last ``history`` norms.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

NORM_EPS = 1e-6  # torch.nn.utils.clip_grad_norm_ and DeepSpeed add it to the norm before dividing


def global_norm(grads: Sequence[torch.Tensor]) -> float:
    """The 2-norm of all ``grads`` together: one norm per tensor (``torch._foreach_norm``, as torch's
    ``clip_grad_norm_`` does), combined in float64; a single host sync on an accelerator."""
    if not grads:
        return 0.0
    norms = torch._foreach_norm([g.detach() for g in grads])
    return float(torch.linalg.vector_norm(torch.stack([n.double().to(norms[0].device) for n in norms])))


def norm_scale(norm: float, threshold: float) -> float:
    """The factor a norm clip multiplies every gradient by: 1.0 when ``norm`` is within ``threshold``."""
    if not math.isfinite(threshold):
        return 1.0
    return min(1.0, threshold / (norm + NORM_EPS))


def percentile(history: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100, linear interpolation, numpy's default) of ``history``; ``inf`` when empty."""
    if not history:
        return math.inf
    ordered = sorted(history)
    position = (len(ordered) - 1) * q / 100.0
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def unit_norms(tensor: torch.Tensor, unit_dim: int = 0) -> torch.Tensor:
    """The 2-norm of every unit of ``tensor``: along ``unit_dim`` for a matrix or kernel (each output unit), the
    whole tensor for a vector or scalar. Shaped to broadcast against ``tensor``."""
    if tensor.dim() <= 1:
        return tensor.norm(2).reshape([1] * tensor.dim())
    dims = [d for d in range(tensor.dim()) if d != unit_dim]
    return tensor.norm(2, dim=dims, keepdim=True)


def agc_(grad: torch.Tensor, weight: torch.Tensor, clip_factor: float, eps: float, unit_dim: int = 0) -> torch.Tensor:
    """Adaptive gradient clipping of ``grad`` in place against ``weight``; returns how many units it clipped, as a
    0-d tensor on the gradient's device (reading it is a device sync: the caller reads all at once)."""
    limit = unit_norms(weight.detach().float(), unit_dim).clamp_min_(eps).mul_(clip_factor)
    norms = unit_norms(grad.float(), unit_dim)
    over = norms > limit
    grad.mul_((limit / norms.clamp_min(NORM_EPS)).clamp_max_(1.0).to(grad.dtype))  # exactly 1 where not over
    return over.sum()
