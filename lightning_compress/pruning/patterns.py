"""Pruning patterns: which weights go together, and the exact masks for a sparsity.

- ``unstructured``: single weights by magnitude; ``scope="global"`` ranks all targeted weights together.
- ``channel``: whole output channels (rows of ``weight.flatten(1)``) by L2 norm, per layer; their biases go too.
- ``N:M``: at most N non-zeros in each group of M consecutive weights along the input dimension (for a conv,
  along input channels at each kernel position). Gradually: a scheduled sparsity ``s`` prunes the fraction
  ``s / (1 - N/M)`` of groups to N:M, the groups that lose the least magnitude first; at the end all groups are N:M.

Masks are boolean (True = kept) and full-shaped. Pruned entries score lowest, so masks only ever shrink.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch

from lightning_compress.pruning.scoring import PRUNED, magnitude, row_norms

Scope = Literal["global", "layer"]
_N_M = re.compile(r"(\d+):(\d+)")


@dataclass(frozen=True)
class Pattern:
    kind: Literal["unstructured", "channel", "n:m"]
    n: int = 0
    m: int = 0

    @classmethod
    def parse(cls, text: str) -> Pattern:
        if text in ("unstructured", "channel"):
            return cls(text)
        match = _N_M.fullmatch(text) if isinstance(text, str) else None
        if not match:
            hint = ""
            if isinstance(text, int) and not isinstance(text, bool):  # YAML 1.1: unquoted 2:4 is 2 * 60 + 4 = 124
                hint = " HINT: YAML reads an unquoted N:M as a base-60 number (2:4 -> 124); quote it: '2:4'."
            raise ValueError(f"`pattern` must be 'unstructured', 'channel' or 'N:M' such as '2:4'; got {text!r}.{hint}")
        n, m = int(match.group(1)), int(match.group(2))
        if not 1 <= n < m:
            raise ValueError(
                f"`pattern` {text!r} keeps N={n} of every M={m} weights: N must satisfy 1 <= N < M (e.g. '2:4')."
            )
        return cls("n:m", n, m)

    @property
    def fixed_sparsity(self) -> float | None:
        """The sparsity an N:M pattern implies (1 - N/M); None for patterns with a free target."""
        return 1.0 - self.n / self.m if self.kind == "n:m" else None

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.kind == "n:m" else self.kind


def lowest(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Boolean mask of the ``count`` lowest of 1-D ``scores``; among equal scores the earlier positions go first.

    The same choice as a stable argsort, in linear time: a k-th value threshold, then ties filled by position.
    """
    chosen = torch.zeros_like(scores, dtype=torch.bool)
    if count <= 0:
        return chosen
    if count >= scores.numel():
        return chosen.fill_(True)
    threshold = torch.kthvalue(scores, count).values
    chosen = scores < threshold
    missing = count - int(chosen.sum())
    if missing > 0:
        chosen[torch.nonzero(scores == threshold).flatten()[:missing]] = True
    return chosen


def compute_masks(
    pattern: Pattern,
    scope: Scope,
    sparsity: float,
    weights: Mapping[str, torch.Tensor],
    masks: Mapping[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """Masks (True = keep) for ``weights`` at ``sparsity`` of the targeted weights; ``masks`` are the current ones."""
    if pattern.kind == "unstructured":
        return _unstructured(scope, sparsity, weights, masks)
    if pattern.kind == "channel":
        return {name: _channel(sparsity, w, masks.get(name)) for name, w in weights.items()}
    return _n_m(pattern, scope, sparsity, weights, masks)


def _unstructured(
    scope: Scope, sparsity: float, weights: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    scores = {name: magnitude(w, masks.get(name)).flatten() for name, w in weights.items()}
    pruned = _lowest_in_scope(scores, sparsity, scope)
    return {name: ~chosen.view_as(weights[name]) for name, chosen in pruned.items()}


def _channel(sparsity: float, weight: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    norms = row_norms(weight, mask)
    keep_rows = ~lowest(norms, round(sparsity * norms.numel()))
    return keep_rows.view(-1, *([1] * (weight.dim() - 1))).expand_as(weight).clone()


def _n_m(
    pattern: Pattern,
    scope: Scope,
    sparsity: float,
    weights: Mapping[str, torch.Tensor],
    masks: Mapping[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    group_fraction = min(1.0, sparsity / pattern.fixed_sparsity)
    grouped = {name: _groups(magnitude(w, masks.get(name)), pattern.m) for name, w in weights.items()}
    # Within a group keep the N largest; a group's cost is the magnitude its M-N smallest would lose.
    order = {name: torch.argsort(g, dim=1, descending=True, stable=True) for name, g in grouped.items()}
    costs = {
        name: torch.gather(g, 1, order[name][:, pattern.n :])
        .clamp_min(0)
        .sum(dim=1)
        .masked_fill((g == PRUNED).any(dim=1), PRUNED)
        for name, g in grouped.items()
    }
    chosen = _lowest_in_scope(costs, group_fraction, scope)
    result = {}
    for name, g in grouped.items():
        keep = torch.ones_like(g, dtype=torch.bool)
        drop = order[name][:, pattern.n :]
        keep.scatter_(1, drop, False)
        keep[~chosen[name]] = True  # groups not yet chosen stay dense
        result[name] = _ungroup(keep, weights[name])
    return result


def _lowest_in_scope(scores: Mapping[str, torch.Tensor], fraction: float, scope: Scope) -> dict[str, torch.Tensor]:
    """The lowest ``fraction`` of the units (1-D scores) of each layer, or of all layers ranked together."""
    if scope == "layer":
        return {name: lowest(s, round(fraction * s.numel())) for name, s in scores.items()}
    flat = torch.cat(list(scores.values()))
    chosen = lowest(flat, round(fraction * flat.numel()))
    return dict(zip(scores, torch.split(chosen, [s.numel() for s in scores.values()]), strict=True))


def _groups(score: torch.Tensor, m: int) -> torch.Tensor:
    """``(groups, m)``: consecutive runs of ``m`` along the input dimension (last, after moving it there)."""
    moved = score.movedim(1, -1) if score.dim() > 2 else score
    return moved.reshape(-1, m)


def _ungroup(grouped: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    if weight.dim() > 2:
        moved_shape = (weight.shape[0], *weight.shape[2:], weight.shape[1])
        return grouped.reshape(moved_shape).movedim(-1, 1).contiguous()
    return grouped.reshape(weight.shape)


def input_dim(weight_shape: torch.Size) -> int:
    """The size of the dimension N:M groups run along (in_features, or input channels)."""
    return weight_shape[1]
