"""Choosing the modules a technique acts on: by type, then by regular expressions over qualified names.

``include`` and ``exclude`` are lists of regular expressions, each matched against the *whole* qualified name from
``model.named_modules()`` (``re.fullmatch``): ``"fc1"`` names ``fc1`` and not ``fc10``; ``"encoder\\..*"`` names
everything under ``encoder``. No ``include`` means every module of a supported type.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

#: Layers with a ``weight`` of shape ``(out_features, in_features, *kernel)``.
WEIGHTED_LAYERS: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def compile_patterns(argument: str, patterns: Sequence[str] | None) -> tuple[re.Pattern[str], ...]:
    """Compile ``patterns``; a bad one raises naming ``argument``, the pattern and the regex error."""
    if patterns is None:
        return ()
    if isinstance(patterns, str) or not all(isinstance(p, str) for p in patterns):
        raise ValueError(
            f"`{argument}` must be a list of regular expressions, got {patterns!r}."
            f' HINT: write {argument}=["{patterns}"] for a single pattern.'
            if isinstance(patterns, str)
            else f"`{argument}` must be a list of regular expressions, got {patterns!r}."
        )
    compiled = []
    for pattern in patterns:
        try:
            compiled.append(re.compile(pattern))
        except re.error as err:
            raise ValueError(f"`{argument}` holds an invalid regular expression {pattern!r}: {err}.") from err
    return tuple(compiled)


@dataclass(frozen=True)
class Targeting:
    """Which modules to act on. Build it in a callback's ``__init__`` so bad patterns fail there."""

    include: tuple[re.Pattern[str], ...] = ()
    exclude: tuple[re.Pattern[str], ...] = ()
    layer_types: tuple[type[nn.Module], ...] = WEIGHTED_LAYERS

    @classmethod
    def from_arguments(
        cls,
        include: Sequence[str] | None,
        exclude: Sequence[str] | None,
        layer_types: tuple[type[nn.Module], ...] = WEIGHTED_LAYERS,
    ) -> Targeting:
        return cls(compile_patterns("include", include), compile_patterns("exclude", exclude), layer_types)

    def select(self, model: nn.Module) -> dict[str, nn.Module]:
        """The targeted modules by qualified name, in ``named_modules()`` order.

        Raises when an ``include`` pattern matches no module of a supported type, or when nothing is left.
        """
        candidates = {name: m for name, m in model.named_modules() if isinstance(m, self.layer_types) and name}
        for pattern in self.include:
            if not any(pattern.fullmatch(name) for name in candidates):
                raise ValueError(
                    f"`include` pattern {pattern.pattern!r} matches no {self._type_names()} module of "
                    f"{type(model).__name__}. Candidates: {_preview(candidates)}."
                    " HINT: patterns must match the whole qualified name (re.fullmatch); use '.*' for a prefix."
                )
        chosen = {
            name: m
            for name, m in candidates.items()
            if (not self.include or any(p.fullmatch(name) for p in self.include))
            and not any(p.fullmatch(name) for p in self.exclude)
        }
        if not chosen:
            raise ValueError(
                f"No module of {type(model).__name__} is left to compress: supported types are {self._type_names()}"
                f" and `include`/`exclude` left none of {_preview(candidates)}."
            )
        return chosen

    def _type_names(self) -> str:
        return "/".join(t.__name__ for t in self.layer_types)


def _preview(names: dict[str, nn.Module] | Sequence[str], limit: int = 12) -> str:
    names = list(names)
    shown = ", ".join(names[:limit]) or "(none)"
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")
