"""Pruning patterns: which weights go together, and the exact masks for a sparsity. A pattern registers itself.

- ``unstructured``: single weights by magnitude; ``scope="global"`` ranks all targeted weights together.
- ``channel``: whole output channels (rows of ``weight.flatten(1)``) by L2 norm, per layer; their biases go too.
- ``N:M``: at most N non-zeros in each group of M consecutive weights along the input dimension (for a conv,
  along input channels at each kernel position). Gradually: a scheduled sparsity ``s`` prunes the fraction
  ``s / (1 - N/M)`` of groups to N:M, the groups that lose the least magnitude first; at the end all groups are N:M.

A new pattern is one subclass of :class:`Pattern` decorated with :func:`register_pattern`, in any file: it says
which texts name it (:meth:`Pattern.from_text`), what it allows (scopes, bias, layer shapes) and how it computes
masks. ``GradualPruning(pattern="...")`` then finds it by its text.

Masks are boolean (True = kept) and full-shaped. Pruned entries score lowest, so masks only ever shrink.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from lightning_compress.pruning.scoring import PRUNED, magnitude, row_norms

Scope = Literal["global", "layer"]
SCOPES: tuple[Scope, ...] = ("global", "layer")

PATTERNS: dict[str, type[Pattern]] = {}
"""Pattern classes by name, in registration order (the order :meth:`Pattern.parse` tries them)."""


def register_pattern(cls: type[Pattern]) -> type[Pattern]:
    """Class decorator: make ``cls`` a pattern that ``Pattern.parse`` (and so ``GradualPruning``) accepts."""
    if not cls.name or cls.name in PATTERNS:
        raise ValueError(f"pattern name {cls.name!r} is empty or already registered ({sorted(PATTERNS)}).")
    PATTERNS[cls.name] = cls
    return cls


@dataclass(frozen=True)
class Pattern:
    """How weights are grouped for pruning. Subclasses set the class attributes and implement :meth:`masks`."""

    name: ClassVar[str] = ""
    syntax: ClassVar[str] = ""
    """How the pattern is written, for error messages (``"'channel'"``, ``"'N:M' such as '2:4'"``)."""
    scopes: ClassVar[tuple[Scope, ...]] = SCOPES
    """The scopes the pattern supports; the first is its default."""
    prunes_bias: ClassVar[bool] = False
    """Whether a weight row pruned whole takes its bias entry with it (a dead channel)."""

    @classmethod
    def from_text(cls, text: str) -> Pattern | None:
        """The pattern ``text`` names, or None when it names another. Default: the text is ``name``."""
        return cls() if text == cls.name else None

    @classmethod
    def parse(cls, text: str) -> Pattern:
        """The registered pattern that ``text`` names; a clear error listing every valid spelling otherwise."""
        for pattern_cls in PATTERNS.values():
            found = pattern_cls.from_text(text) if isinstance(text, str) else None
            if found is not None:
                return found
        hint = ""
        if isinstance(text, int) and not isinstance(text, bool):  # YAML 1.1: unquoted 2:4 is 2 * 60 + 4 = 124
            hint = " HINT: YAML reads an unquoted N:M as a base-60 number (2:4 -> 124); quote it: '2:4'."
        spellings = [p.syntax or repr(p.name) for p in PATTERNS.values()]
        listed = ", ".join(spellings[:-1]) + f" or {spellings[-1]}" if len(spellings) > 1 else spellings[0]
        raise ValueError(f"`pattern` must be {listed}; got {text!r}.{hint}")

    @property
    def fixed_sparsity(self) -> float | None:
        """The sparsity the pattern implies (N:M: 1 - N/M); None for patterns with a free target."""
        return None

    def check_scope(self, scope: Scope) -> None:
        """Refuse a scope the pattern does not support (override for a reason in words)."""
        if scope not in self.scopes:
            raise ValueError(f"`pattern`={str(self)!r} supports `scope` {' or '.join(map(repr, self.scopes))} only.")

    def check_layer(self, name: str, module_type: str, weight_shape: torch.Size) -> None:
        """Refuse a layer whose weight shape the pattern cannot prune (called at setup, before any step)."""

    def masks(
        self, scope: Scope, sparsity: float, weights: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Masks (True = keep) for ``weights`` at ``sparsity``; ``masks`` are the current ones (keep them pruned).

        By default: the units' scores, the lowest :meth:`unit_fraction` of them in ``scope`` chosen, and the masks
        built from the choice. A pattern may override this instead of the three unit methods; under ZeRO-3 it is
        then computed on gathered weights."""
        scores = {name: self.unit_scores(w, masks.get(name)) for name, w in weights.items()}
        chosen = lowest_in_scope(scores, self.unit_fraction(sparsity), scope)
        return {name: self.masks_for_units(w, masks.get(name), chosen[name]) for name, w in weights.items()}

    # A pattern prunes *units* (single weights, channels, N:M groups): the methods below split it into scoring,
    # ranking and mask building, so the ranking can also run over shards on several ranks (ZeRO-3, ``sharded.py``).

    def unit_fraction(self, sparsity: float) -> float:
        """The fraction of units to prune for a weight ``sparsity``."""
        return sparsity

    def unit_scores(self, weight: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """1-D scores of the units of one ``(out, in, ...)`` weight, pruned units at ``PRUNED``; lowest go first."""
        raise NotImplementedError

    def masks_for_units(self, weight: torch.Tensor, mask: torch.Tensor | None, chosen: torch.Tensor) -> torch.Tensor:
        """The weight's mask (True = keep) with the units ``chosen`` (1-D bool, as :meth:`unit_scores`) pruned."""
        raise NotImplementedError

    @property
    def has_units(self) -> bool:
        """Whether the pattern implements the unit methods (else only :meth:`masks`)."""
        return type(self).unit_scores is not Pattern.unit_scores

    def __str__(self) -> str:
        return self.name


@register_pattern
@dataclass(frozen=True)
class Unstructured(Pattern):
    name: ClassVar[str] = "unstructured"

    def unit_scores(self, weight: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return magnitude(weight, mask).flatten()

    def masks_for_units(self, weight: torch.Tensor, mask: torch.Tensor | None, chosen: torch.Tensor) -> torch.Tensor:
        return ~chosen.view_as(weight)


@register_pattern
@dataclass(frozen=True)
class Channel(Pattern):
    name: ClassVar[str] = "channel"
    scopes: ClassVar[tuple[Scope, ...]] = ("layer",)
    prunes_bias: ClassVar[bool] = True

    def check_scope(self, scope: Scope) -> None:
        if scope == "global":
            raise ValueError(
                "`pattern`='channel' with `scope`='global' is not supported: channel norms of layers of different"
                " widths are not comparable. HINT: use scope='layer' (every layer loses the same share of channels)."
            )
        super().check_scope(scope)

    def unit_scores(self, weight: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return row_norms(weight, mask)

    def masks_for_units(self, weight: torch.Tensor, mask: torch.Tensor | None, chosen: torch.Tensor) -> torch.Tensor:
        return (~chosen).view(-1, *([1] * (weight.dim() - 1))).expand_as(weight).clone()


_N_M = re.compile(r"(\d+):(\d+)")


@register_pattern
@dataclass(frozen=True)
class NM(Pattern):
    """At most ``n`` non-zeros in every ``m`` consecutive weights along the input dimension."""

    n: int = 2
    m: int = 4
    name: ClassVar[str] = "N:M"
    syntax: ClassVar[str] = "'N:M' such as '2:4'"

    @classmethod
    def from_text(cls, text: str) -> Pattern | None:
        match = _N_M.fullmatch(text)
        if not match:
            return None
        n, m = int(match.group(1)), int(match.group(2))
        if not 1 <= n < m:
            raise ValueError(
                f"`pattern` {text!r} keeps N={n} of every M={m} weights: N must satisfy 1 <= N < M (e.g. '2:4')."
            )
        return cls(n, m)

    @property
    def fixed_sparsity(self) -> float:
        return 1.0 - self.n / self.m

    def check_layer(self, name: str, module_type: str, weight_shape: torch.Size) -> None:
        if input_dim(weight_shape) % self.m:
            raise ValueError(
                f"`pattern`={str(self)!r} needs the input dimension of every pruned layer to be a multiple"
                f" of M={self.m}, but {name} ({module_type}) has {input_dim(weight_shape)}."
                f" HINT: add {name!r} to `exclude`."
            )

    def unit_fraction(self, sparsity: float) -> float:
        return min(1.0, sparsity / self.fixed_sparsity)

    def unit_scores(self, weight: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """A group's cost: the magnitude its M-N smallest weights would lose (a group holding a pruned weight is
        already N:M, and scores ``PRUNED``)."""
        grouped = _groups(magnitude(weight, mask), self.m)
        smallest = torch.sort(grouped, dim=1, descending=True, stable=True).values[:, self.n :]
        return smallest.clamp_min(0).sum(dim=1).masked_fill((grouped == PRUNED).any(dim=1), PRUNED)

    def masks_for_units(self, weight: torch.Tensor, mask: torch.Tensor | None, chosen: torch.Tensor) -> torch.Tensor:
        """Within a chosen group keep the N largest (ties: the earlier); groups not chosen stay dense."""
        grouped = _groups(magnitude(weight, mask), self.m)
        order = torch.argsort(grouped, dim=1, descending=True, stable=True)
        keep = torch.ones_like(grouped, dtype=torch.bool)
        keep.scatter_(1, order[:, self.n :], False)
        keep[~chosen] = True
        return _ungroup(keep, weight)

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"


def compute_masks(
    pattern: Pattern,
    scope: Scope,
    sparsity: float,
    weights: Mapping[str, torch.Tensor],
    masks: Mapping[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """Masks (True = keep) for ``weights`` at ``sparsity`` of the targeted weights; ``masks`` are the current ones."""
    return pattern.masks(scope, sparsity, weights, masks)


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


def lowest_in_scope(scores: Mapping[str, torch.Tensor], fraction: float, scope: Scope) -> dict[str, torch.Tensor]:
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
