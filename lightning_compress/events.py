"""A small log of compression events per Trainer: what changed, at which step, published by the technique.

Other callbacks read it instead of importing a technique: the monitor re-measures only after an event, a warm-up
schedule re-warms after one. The log lives beside the Trainer (weakly keyed) and is not checkpointed: events are
facts about this process's run, and a resumed run publishes its own.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any

_LOGS: weakref.WeakKeyDictionary[Any, list[CompressionEvent]] = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class CompressionEvent:
    """``kind`` names what changed (``"masks"``, ``"rewind"``, ...); ``detail`` is small and JSON-able."""

    step: int
    source: str
    kind: str
    detail: dict[str, Any] = field(default_factory=dict)


def publish(trainer: Any, event: CompressionEvent) -> None:
    _LOGS.setdefault(trainer, []).append(event)


def history(trainer: Any) -> tuple[CompressionEvent, ...]:
    """Every event published for ``trainer`` so far, oldest first."""
    return tuple(_LOGS.get(trainer, ()))
