"""Argument checks shared by the bundled DataModules and models (messages name the argument, value, valid range)."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any


def check_int(name: str, value: Any, minimum: int = 1, allow_none: bool = False) -> None:
    """Raise ``ValueError`` unless ``value`` is an ``int`` (not a bool) ``>= minimum`` (or ``None`` if allowed)."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        valid = f"an integer >= {minimum}" + (" or None" if allow_none else "")
        raise ValueError(f"`{name}` must be {valid}, got {value!r}.")


def check_positive_float(name: str, value: Any) -> None:
    """Raise ``ValueError`` unless ``value`` is a finite real number ``> 0``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
        raise ValueError(f"`{name}` must be a finite number > 0, got {value!r}.")


def check_fraction(name: str, value: Any, low_inclusive: bool = False) -> None:
    """Raise ``ValueError`` unless ``value`` lies in ``(0, 1)`` (or ``[0, 1)`` with ``low_inclusive``)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = ok and (0 <= value < 1 if low_inclusive else 0 < value < 1)
    if not ok:
        interval = "[0, 1)" if low_inclusive else "(0, 1)"
        raise ValueError(f"`{name}` must be a number in {interval}, got {value!r}.")


def check_choice(name: str, value: Any, choices: Collection[str]) -> None:
    """Raise ``ValueError`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {sorted(choices)}, got {value!r}.")
