"""Importance scores, apart from the pattern that groups them and the schedule that decides how many go.

A pruned weight scores -1, below any live weight's score, so a mask never revives what it pruned.
"""

from __future__ import annotations

import torch

PRUNED = -1.0


def magnitude(weight: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``|weight|`` as float32, with already-pruned entries at -1."""
    score = weight.detach().abs().float()
    return score if mask is None else score.masked_fill(~mask, PRUNED)


def row_norms(weight: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """L2 norm of each output channel (row of ``weight.flatten(1)``); rows already pruned at -1."""
    flat = weight.detach().float().flatten(1)
    norms = flat.norm(dim=1)
    if mask is None:
        return norms
    return norms.masked_fill(~mask.flatten(1).any(dim=1), PRUNED)
