"""What a stabiliser reads of the compression events (:mod:`lightning_compress.events`): the new ones of its kinds.

A stabiliser reads the log once per optimizer step, from ``on_before_optimizer_step`` or the optimizer's step
hooks, where every event of that step has been published whatever the order of the callbacks. Events a technique
announces again after a resume (``resumed=True``) are not new changes and are skipped; what a stabiliser must
remember across a resume (the step of the last event) it keeps in its own ``state_dict``.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any

from lightning_compress import arguments, events


def check_kinds(name: str, kinds: Sequence[str] | None) -> tuple[str, ...]:
    """The event kinds of argument ``name``: ``None`` means every kind; an unknown kind is refused."""
    if kinds is None:
        return events.KINDS
    if isinstance(kinds, str) or not all(isinstance(k, str) for k in kinds):
        raise arguments.refusal(name, kinds, f"a list of event kinds ({', '.join(events.KINDS)}) or None")
    unknown = [k for k in kinds if k not in events.KINDS]
    if unknown:
        raise arguments.refusal(
            name,
            list(kinds),
            f"a list of the event kinds {', '.join(events.KINDS)}",
            f"{unknown[0]!r} is not one; None reacts to every kind, [] to none.",
        )
    return tuple(dict.fromkeys(kinds))


class EventWatch:
    """The events of ``kinds`` published for one Trainer since the last read."""

    def __init__(self, kinds: Sequence[str]) -> None:
        self.kinds = tuple(kinds)
        self._trainer: weakref.ref[Any] | None = None
        self._seen = 0

    def start(self, trainer: Any) -> None:
        """Read from now on: events published before (by another fit of this Trainer) are not new."""
        self._trainer = weakref.ref(trainer)
        self._seen = len(events.history(trainer))

    def new_events(self, trainer: Any) -> list[events.CompressionEvent]:
        if self._trainer is None or self._trainer() is not trainer:
            self.start(trainer)
        log = events.history(trainer)
        fresh, self._seen = log[self._seen :], len(log)
        return [event for event in fresh if event.kind in self.kinds and not event.resumed]
