"""Choosing the modules a technique acts on: by type, then by regular expressions over qualified names.

``include`` and ``exclude`` are lists of regular expressions, each matched against the *whole* qualified name from
``model.named_modules()`` (``re.fullmatch``): ``"fc1"`` names ``fc1`` and not ``fc10``; ``"encoder\\..*"`` names
everything under ``encoder``. No ``include`` means every module of a supported type.

**Tied weights are left out.** A module whose weight is the same Parameter as another module's (GPT-2's and T5's
``lm_head`` share the token embedding) is never selected: compressing one side would silently change the other, and
factorising it would break the tie and grow the model. One log line names what was left out; an ``include`` pattern
that names only tied modules is refused (untie them first, e.g. ``tie_word_embeddings=False``, to compress them).

transformers' ``Conv1D`` (GPT-2's attention and MLP layers: ``y = x @ W + b`` with ``W`` stored ``(in, out)``) is a
candidate for the techniques that set ``transformers_conv1d``; :func:`weight_is_transposed` tells them its layout.
transformers is never imported here: when it is not loaded, no module can be a Conv1D.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from lightning_compress._lightning import rank_zero_info

#: Layers with a ``weight`` of shape ``(out_features, in_features, *kernel)``.
WEIGHTED_LAYERS: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def transformers_conv1d() -> type[nn.Module] | None:
    """transformers' ``Conv1D`` class when transformers' model code is loaded; ``None`` otherwise (no import)."""
    utils = sys.modules.get("transformers.pytorch_utils")
    return getattr(utils, "Conv1D", None)


def weight_is_transposed(module: nn.Module) -> bool:
    """Whether ``module.weight`` is stored ``(in, out)`` (transformers' ``Conv1D``) instead of ``(out, in, ...)``."""
    conv1d = transformers_conv1d()
    return conv1d is not None and isinstance(module, conv1d)


def tied_parameters(model: nn.Module) -> dict[str, list[str]]:
    """Every module of ``model`` that holds a Parameter also held by another module: name -> the other holders."""
    holders: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        for param in module._parameters.values():
            if param is not None and name not in holders.setdefault(id(param), []):
                holders[id(param)].append(name)
    tied: dict[str, list[str]] = {}
    for names in holders.values():
        for name in names if len(names) > 1 else ():
            tied.setdefault(name, []).extend(other for other in names if other != name)
    return tied


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
    transformers_conv1d: bool = False  # also transformers' Conv1D (weight stored (in, out))

    @classmethod
    def from_arguments(
        cls,
        include: Sequence[str] | None,
        exclude: Sequence[str] | None,
        layer_types: tuple[type[nn.Module], ...] = WEIGHTED_LAYERS,
        *,
        transformers_conv1d: bool = False,
    ) -> Targeting:
        return cls(compile_patterns("include", include), compile_patterns("exclude", exclude), layer_types,
                   transformers_conv1d)  # fmt: skip

    def candidate_types(self) -> tuple[type[nn.Module], ...]:
        conv1d = transformers_conv1d() if self.transformers_conv1d else None
        return self.layer_types + ((conv1d,) if conv1d is not None else ())

    def select(self, model: nn.Module, technique: str = "") -> dict[str, nn.Module]:
        """The targeted modules by qualified name, in ``named_modules()`` order; tied weights left out (and said so
        in one log line naming ``technique``, when given).

        Raises when an ``include`` pattern matches no module of a supported type, or only tied ones, or when nothing
        is left.
        """
        types = self.candidate_types()
        candidates = {name: m for name, m in model.named_modules() if isinstance(m, types) and name}
        for pattern in self.include:
            if not any(pattern.fullmatch(name) for name in candidates):
                unsupported = _unsupported_matches(model, pattern, types)
                hint = (
                    "drop the pattern, or compress those layers with a technique that supports them."
                    if unsupported
                    else "patterns must match the whole qualified name (re.fullmatch); use '.*' for a prefix."
                )
                raise ValueError(
                    f"`include` pattern {pattern.pattern!r} matches no {self._type_names()} module of "
                    f"{type(model).__name__}{unsupported}. Candidates: {_preview(candidates)}. HINT: {hint}"
                )
        chosen = {
            name: m
            for name, m in candidates.items()
            if (not self.include or any(p.fullmatch(name) for p in self.include))
            and not any(p.fullmatch(name) for p in self.exclude)
        }
        tied = {name: others for name, others in tied_parameters(model).items() if name in chosen}
        for pattern in self.include:
            named = [name for name in chosen if pattern.fullmatch(name)]
            if named and all(name in tied for name in named):
                raise ValueError(
                    f"`include` pattern {pattern.pattern!r} names only layers whose weight is tied to another module:"
                    f" {_ties_text(tied, named)}. Compressing one side of a tie changes the other, so tied weights are"
                    " left out. HINT: untie them first (for transformers, config.tie_word_embeddings=False) or drop"
                    " the pattern."
                )
        if tied and technique:
            rank_zero_info(
                f"{technique} leaves {_ties_text(tied, list(tied))} uncompressed: a tied weight"
                " (one Parameter in several modules) would change on every side."
            )
        chosen = {name: m for name, m in chosen.items() if name not in tied}
        if not chosen:
            raise ValueError(
                f"No module of {type(model).__name__} is left to compress: supported types are {self._type_names()}"
                f" and `include`/`exclude` left none of {_preview(candidates)}"
                f"{' (tied weights are left out)' if tied else ''}{_unsupported_summary(model, types)}."
            )
        return chosen

    def _type_names(self) -> str:
        names = [t.__name__ for t in self.layer_types] + (["transformers Conv1D"] if self.transformers_conv1d else [])
        return "/".join(names)


def _weighted_modules_of_other_types(model: nn.Module, types: tuple[type[nn.Module], ...]) -> dict[str, nn.Module]:
    """Modules with a weight matrix (2-D or more) that are not of ``types`` (embeddings and norms aside)."""
    return {
        name: m
        for name, m in model.named_modules()
        if name
        and not isinstance(m, (*types, nn.Embedding, nn.EmbeddingBag))
        and isinstance(m._parameters.get("weight"), torch.Tensor)
        and m._parameters["weight"].dim() >= 2
    }


def _unsupported_matches(model: nn.Module, pattern: re.Pattern[str], types: tuple[type[nn.Module], ...]) -> str:
    others = {n: m for n, m in _weighted_modules_of_other_types(model, types).items() if pattern.fullmatch(n)}
    if not others:
        return ""
    kinds = sorted({type(m).__name__ for m in others.values()})
    return f" (it names {_preview(others, 4)}, of type {'/'.join(kinds)}, which this technique does not support)"


def _unsupported_summary(model: nn.Module, types: tuple[type[nn.Module], ...]) -> str:
    others = _weighted_modules_of_other_types(model, types)
    if not others:
        return ""
    kinds = sorted({f"{type(m).__module__}.{type(m).__name__}" for m in others.values()})
    return (
        f"; the model's other weighted layers ({_preview(others, 4)}) are of type {', '.join(kinds)}, which this"
        " technique does not support. HINT: `include` layers of a supported type, or leave this model's layers to a"
        " technique that supports them"
    )


def _ties_text(tied: dict[str, list[str]], names: list[str]) -> str:
    return ", ".join(f"{name} (tied to {', '.join(tied[name])})" for name in names)


def _preview(names: dict[str, nn.Module] | Sequence[str], limit: int = 12) -> str:
    names = list(names)
    shown = ", ".join(names[:limit]) or "(none)"
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")
