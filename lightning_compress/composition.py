"""Several techniques on one model: one order in which they act, whatever the order of ``Trainer(callbacks=...)``.

Lightning calls callbacks in list order, and the techniques change the model (low-rank and QAT swap layers), so
list order would change the result. Instead, the first compression callback that reaches ``setup`` prepares all of
them, in the order below, and puts them in that order in ``trainer.callbacks`` (only the places they already hold;
every other callback keeps its place), so every later hook also runs in it. Any order of the list then trains the
same model, bitwise on CPU.

The order, by :attr:`Composable.composition_rank`:

1. ``LowRankRefactoring`` - changes which weights exist (two factors instead of one matrix);
2. ``GradualPruning`` - masks the weights that exist;
3. ``QuantizationAwareTraining`` - fake-quantizes what is there, zeros included, and converts it to int8.

Before any of them touches the model, every ``CompressionMonitor`` captures its dense baseline.

Where two of them target the same layer, QAT composes with either of the others: a pruned layer quantized (its zeros
are int8 zeros), or a factorised layer quantized (both factors fake-quantized, int8 factors once converted; the rank
mask keeps falling through the same buffer). A layer both factorised and pruned, or one technique twice on a layer,
is refused at ``setup``, before any layer is swapped, naming both callbacks and the shared layers. Targets are read
from the model as it was given, so the refusal is the same in every order.
"""

from __future__ import annotations

from typing import Any, ClassVar

from torch import nn

from lightning_compress._lightning import pl, rank_zero_info

#: Pairs of techniques that may act on the same layer, by class name.
COMPOSE_ON_ONE_LAYER: frozenset[frozenset[str]] = frozenset(
    {
        frozenset({"GradualPruning", "QuantizationAwareTraining"}),  # a pruned layer quantized: int8 zeros
        frozenset({"LowRankRefactoring", "QuantizationAwareTraining"}),  # the factors quantized, int8 when converted
    }
)

_WHY_NOT = {
    frozenset({"GradualPruning", "LowRankRefactoring"}): "a factorised layer has no dense weight left to mask",
}


class Composable:
    """A technique the coordinator prepares: the three compression callbacks inherit it."""

    composition_rank: ClassVar[int]
    """Where the technique acts among the others: lower acts first (see the module docstring); instances of one
    technique act in the order of their ``state_key``."""

    def planned_targets(self, model: nn.Module) -> list[str]:
        """The qualified names of the layers it would act on in ``model`` as it is now; raises on bad targeting."""
        return list(self.targeting.select(model))  # type: ignore[attr-defined]

    def is_prepared(self, pl_module: pl.LightningModule) -> bool:
        raise NotImplementedError

    def after_composition(self, pl_module: pl.LightningModule) -> None:
        """Called once every technique is prepared: take up what a later one put in place of this one's layers."""

    def check_fit(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Refuse what would fail later (an export path that exists, ...); called for every technique before any
        of them changes the model."""

    def prepare_fit(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The technique's own ``setup`` work (its layer swaps and choices); called once per fit, in order."""
        raise NotImplementedError


def prepare_all(trainer: pl.Trainer, pl_module: pl.LightningModule, caller: Composable) -> None:
    """Prepare every compression callback of ``trainer`` (and ``caller``) not yet prepared, in the defined order."""
    callbacks = getattr(trainer, "callbacks", None) or []  # a bare stand-in trainer (a script, a test) has none
    listed = [cb for cb in callbacks if isinstance(cb, Composable)]
    techniques = listed if caller in listed else [*listed, caller]
    pending = [cb for cb in sorted(techniques, key=_rank) if not cb.is_prepared(pl_module)]
    if not pending:
        return
    for callback in callbacks:
        capture = getattr(callback, "capture_baseline", None)  # CompressionMonitor: the dense model, before swaps
        if callable(capture):
            capture(trainer, pl_module)
    for technique in pending:
        technique.check_fit(trainer, pl_module)
    _refuse_overlaps(pending, pl_module)
    for technique in pending:
        technique.prepare_fit(trainer, pl_module)
    for technique in pending:
        technique.after_composition(pl_module)
    _put_in_order(trainer, listed)


def _rank(technique: Composable) -> tuple[int, str]:
    """The order of action; two instances of one technique by their ``state_key`` (distinct by construction)."""
    return technique.composition_rank, technique.state_key  # type: ignore[attr-defined]


def _refuse_overlaps(techniques: list[Composable], model: nn.Module) -> None:
    targets = [(technique, set(technique.planned_targets(model))) for technique in techniques]
    for i, (first, first_targets) in enumerate(targets):
        for second, second_targets in targets[i + 1 :]:
            shared = sorted(first_targets & second_targets)
            names = frozenset({type(first).__name__, type(second).__name__})
            if not shared or names in COMPOSE_ON_ONE_LAYER:
                continue
            why = _WHY_NOT.get(names, "two instances of one technique would act twice on the same weights")
            shown = ", ".join(shared[:6]) + (f" and {len(shared) - 6} more" if len(shared) > 6 else "")
            raise ValueError(
                f"{_describe(first)} and {_describe(second)} both target {shown}: {why}. Only"
                " QuantizationAwareTraining may share a layer with another technique. HINT: give them disjoint layers"
                f" with `include` / `exclude`, e.g. exclude={shared[:2]!r} on one of them."
            )


def _describe(technique: Any) -> str:
    include, exclude = getattr(technique, "include", None), getattr(technique, "exclude", None)
    scope = f"include={include!r}" if include else "no include"
    return f"{type(technique).__name__}({scope}{f', exclude={exclude!r}' if exclude else ''})"


def _put_in_order(trainer: pl.Trainer, listed: list[Composable]) -> None:
    ordered = sorted(listed, key=_rank)
    if ordered == listed:
        return
    slots = [i for i, callback in enumerate(trainer.callbacks) if isinstance(callback, Composable)]
    for slot, technique in zip(slots, ordered, strict=True):
        trainer.callbacks[slot] = technique
    rank_zero_info(
        "lightning_compress runs its callbacks in the order "
        + ", ".join(type(t).__name__ for t in ordered)
        + " (lightning_compress.composition), whatever their order in `callbacks`."
    )
