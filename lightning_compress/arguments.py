"""The argument checks the callbacks share, with one message shape for all of them.

Every refusal reads ``` `name` must be <what is valid>; got <value>. HINT: <what to do>```, so the same argument is
refused with the same words by every callback that takes it. Checks return the value they accept (normalised: a
fraction as ``float``), so a constructor reads ``self.x = arguments.fraction("x", x, ...)``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def refusal(name: str, value: Any, valid: str, hint: str = "") -> ValueError:
    """The error for argument ``name`` holding ``value`` where ``valid`` (words) was expected."""
    return ValueError(f"`{name}` must be {valid}; got {value!r}." + (f" HINT: {hint}" if hint else ""))


def is_integer(value: Any) -> bool:
    """An ``int`` that is not a ``bool`` (YAML's ``true`` must not pass as a step)."""
    return isinstance(value, int) and not isinstance(value, bool)


def integer(
    name: str,
    value: Any,
    *,
    minimum: int | None = 0,
    maximum: int | None = None,
    allow_none: bool = False,
    what: str = "",
    hint: str = "",
) -> int | None:
    """``value`` if it is an integer in ``[minimum, maximum]`` (or None when ``allow_none``), else a refusal."""
    if value is None and allow_none:
        return None
    in_range = is_integer(value) and (minimum is None or value >= minimum) and (maximum is None or value <= maximum)
    if in_range:
        return value
    if minimum is not None and maximum is not None:
        valid = f"an integer from {minimum} to {maximum}"
    elif minimum is not None:
        valid = f"an integer >= {minimum}"
    else:
        valid = "an integer"
    valid += (" or None" if allow_none else "") + (f" {what}" if what else "")
    raise refusal(name, value, valid, hint)


def step(
    name: str, value: Any, *, after: tuple[str, int] | None = None, allow_none: bool = False, hint: str = ""
) -> int | None:
    """An optimizer step (``trainer.global_step``): an integer >= 0, or >= the step named in ``after``."""
    if after is None:
        return integer(name, value, allow_none=allow_none, hint=hint or "steps count optimizer steps from 0.")
    after_name, after_value = after
    if (value is None and allow_none) or (is_integer(value) and value >= after_value):
        return value
    valid = f"an integer step >= `{after_name}`={after_value}" + (" or None" if allow_none else "")
    raise refusal(name, value, valid, hint)


def fraction(
    name: str,
    value: Any,
    *,
    low: float = 0.0,
    high: float = 1.0,
    low_open: bool = False,
    high_open: bool = False,
    what: str = "",
    hint: str = "",
) -> float:
    """``value`` as a float if it is a number in the interval (``low_open`` / ``high_open`` exclude the ends)."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if number and (low < value if low_open else low <= value) and (value < high if high_open else value <= high):
        return float(value)
    interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    raise refusal(name, value, f"a number in {interval}" + (f" {what}" if what else ""), hint)


def flag(name: str, value: Any) -> bool:
    """``value`` if it is True or False (not 1, not 'yes')."""
    if isinstance(value, bool):
        return value
    raise refusal(name, value, "True or False")


def choice(name: str, value: Any, choices: Sequence[str], hint: str = "") -> str:
    """``value`` if it is one of ``choices``."""
    if isinstance(value, str) and value in choices:
        return value
    raise refusal(name, value, f"one of {', '.join(choices)}", hint)


def exactly_one(given: dict[str, Any], hint: str = "") -> tuple[str, Any]:
    """The one argument of ``given`` (name -> value) that is not None, as ``(name, value)``; else a refusal."""
    chosen = [(name, value) for name, value in given.items() if value is not None]
    if len(chosen) == 1:
        return chosen[0]
    names = list(given)
    listed = ", ".join(f"`{n}`" for n in names[:-1]) + f" and `{names[-1]}`"
    got = ", ".join(f"{k}={v!r}" for k, v in given.items())
    raise ValueError(f"Give exactly one of {listed}; got {got}." + (f" HINT: {hint}" if hint else ""))


def settings_key(callback: Any, settings: Mapping[str, Any]) -> str:
    """A callback's ``state_key``: its class and every setting that changes what it computes.

    Lightning stores each callback's state under its ``state_key``, so two instances in one Trainer must differ in
    it whenever their settings differ, and a resumed run must find its own. Settings that only say where to log or
    write (``log_per_layer``, ``export_path``) are left out: changing them on resume keeps the state.
    """
    return callback._generate_state_key(**dict(sorted(settings.items())))
