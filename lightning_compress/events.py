"""A small log of compression events per Trainer: what changed, at which step, published by the technique.

Other callbacks read it instead of importing a technique: the monitor re-measures only after an event, the
stabilisers (:mod:`lightning_compress.stabilizers`) re-warm the learning rate and hold the clipping threshold after
one. The log lives beside the Trainer (weakly keyed) and is not checkpointed: events are facts about this process's
run, and a resumed run publishes its own; a consumer that must remember an event across a resume (the step of the
last one) keeps that in its own ``state_dict``.

The contract, which every technique keeps:

- ``kind`` is one of :data:`KINDS`;
- ``step`` is the first optimizer step (``trainer.global_step``) that trains the changed model;
- events are published only in ``on_train_start``, ``on_train_batch_start`` and ``on_train_batch_end``, never
  between backward and the optimizer step, so a consumer reading the log in ``on_before_optimizer_step`` sees an
  event in the same step whatever the order of ``Trainer(callbacks=...)``;
- ``resumed=True`` marks a state restored from a checkpoint and announced again (the monitor re-measures), not a
  new change of the model: a stabiliser does not react to it.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any, Final

MASKS: Final = "masks"
"""GradualPruning set new masks (a sparsity jump)."""
QUANTIZE: Final = "quantize"
"""QuantizationAwareTraining switched fake quantization on."""
LOWRANK: Final = "lowrank"
"""LowRankRefactoring cut ranks."""
KINDS: Final = (MASKS, QUANTIZE, LOWRANK)

_LOGS: weakref.WeakKeyDictionary[Any, list[CompressionEvent]] = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class CompressionEvent:
    """``kind`` names what changed (one of :data:`KINDS`); ``detail`` is small and JSON-able."""

    step: int
    source: str
    kind: str
    detail: dict[str, Any] = field(default_factory=dict)
    resumed: bool = False


def publish(trainer: Any, event: CompressionEvent) -> None:
    if event.kind not in KINDS:
        raise ValueError(f"unknown compression event kind {event.kind!r}; the kinds are {', '.join(KINDS)}")
    _LOGS.setdefault(trainer, []).append(event)


def history(trainer: Any) -> tuple[CompressionEvent, ...]:
    """Every event published for ``trainer`` so far, oldest first."""
    return tuple(_LOGS.get(trainer, ()))
