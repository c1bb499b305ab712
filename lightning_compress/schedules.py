"""Compression schedules: pure functions of the optimizer step, chosen by name.

Every schedule rises from ``initial`` before ``start_step`` to ``target`` at ``end_step`` and holds after it.
The value changes only on the update grid ``start_step + k * update_every`` (and at ``end_step``), so a run
resumed from any step recomputes exactly what an uninterrupted run had.
"""

from __future__ import annotations

import math
from typing import Literal, get_args

ScheduleName = Literal["cubic", "linear", "exponential", "constant"]
SCHEDULES: tuple[str, ...] = get_args(ScheduleName)


def progress(step: int, start_step: int, end_step: int, update_every: int = 1) -> float:
    """Fraction of the way from ``start_step`` to ``end_step`` at ``step``, snapped down to the update grid."""
    if step < start_step:
        return 0.0
    if step >= end_step:
        return 1.0
    snapped = start_step + (step - start_step) // update_every * update_every
    return (snapped - start_step) / (end_step - start_step)


def shape(schedule: ScheduleName, fraction: float, initial: float, target: float) -> float:
    """The value a named schedule takes at ``fraction`` (0 = start, 1 = end) of its ramp."""
    if schedule not in SCHEDULES:
        raise ValueError(f"`schedule` must be one of {', '.join(SCHEDULES)}; got {schedule!r}.")
    if schedule == "constant" or fraction >= 1.0:
        return target  # exactly: the formulas below may round (exponential to 0.3 gives 0.30000000000000004)
    if schedule == "linear":
        return initial + (target - initial) * fraction
    if schedule == "cubic":  # Zhu & Gupta 2017: fast early, gentle as the target nears
        return target + (initial - target) * (1.0 - fraction) ** 3
    # exponential: the kept fraction (1 - value) decays geometrically
    kept_start, kept_end = 1.0 - initial, 1.0 - target
    return 1.0 - kept_start * math.exp(fraction * math.log(kept_end / kept_start))


def value_at(
    step: int,
    *,
    schedule: ScheduleName,
    target: float,
    start_step: int,
    end_step: int,
    update_every: int = 1,
    initial: float = 0.0,
) -> float:
    """The scheduled value (e.g. sparsity) at optimizer step ``step``; ``initial`` before ``start_step``."""
    if step < start_step:
        return initial
    return shape(schedule, progress(step, start_step, end_step, update_every), initial, target)
