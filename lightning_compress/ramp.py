"""The step ramp that the ramping techniques share: from ``start_step`` to ``end_step`` along a named schedule.

GradualPruning ramps sparsity and LowRankRefactoring ramps the share of components switched off; both take the same
four arguments with the same meaning, checked here once. Values change only on the update grid
``start_step + k * update_every`` and at ``end_step``, so a resumed run recomputes exactly what an uninterrupted one
had (see :mod:`lightning_compress.schedules`).
"""

from __future__ import annotations

from dataclasses import dataclass

from lightning_compress import arguments, schedules
from lightning_compress.schedules import ScheduleName


@dataclass(frozen=True, kw_only=True)
class StepRamp:
    """``start_step`` .. ``end_step`` (optimizer steps), updated every ``update_every`` steps along ``schedule``."""

    start_step: int = 0
    end_step: int | None = None
    update_every: int = 10
    schedule: ScheduleName = "cubic"

    def __post_init__(self) -> None:
        arguments.step("start_step", self.start_step)
        if not arguments.is_integer(self.end_step):
            raise arguments.refusal(
                "end_step", self.end_step, f"an integer step after `start_step`={self.start_step}", _ONE_SHOT
            )
        if self.end_step <= self.start_step:
            raise ValueError(
                f"`end_step` must be greater than `start_step`: got end_step={self.end_step},"
                f" start_step={self.start_step}. HINT: {_ONE_SHOT}"
            )
        arguments.integer("update_every", self.update_every, minimum=1, hint="optimizer steps between updates.")
        arguments.choice(
            "schedule",
            self.schedule,
            schedules.SCHEDULES,
            hint="'cubic' (Zhu & Gupta 2017) moves fast early and gently near the target; 'constant' all at once.",
        )

    def should_update(self, step: int) -> bool:
        """Whether ``step`` is on the update grid (``start_step``, every ``update_every`` after it, ``end_step``)."""
        if step < self.start_step or step > self.end_step:
            return False
        return step == self.end_step or (step - self.start_step) % self.update_every == 0

    def value_at(self, step: int, target: float, initial: float = 0.0) -> float:
        """The scheduled value after ``step`` optimizer steps: ``initial`` before the ramp, ``target`` from its end."""
        return schedules.value_at(
            step,
            schedule=self.schedule,
            target=target,
            start_step=self.start_step,
            end_step=self.end_step,
            update_every=self.update_every,
            initial=initial,
        )


_ONE_SHOT = "for a one-shot change use schedule='constant' with end_step=start_step + 1."


class Ramped:
    """For a technique that keeps its :class:`StepRamp` in ``self.ramp``: the ramp's settings as its own attributes,
    and the update policy (override :meth:`should_update` to act on another grid)."""

    ramp: StepRamp

    @property
    def start_step(self) -> int:
        return self.ramp.start_step

    @property
    def end_step(self) -> int:
        return self.ramp.end_step

    @property
    def update_every(self) -> int:
        return self.ramp.update_every

    @property
    def schedule(self) -> ScheduleName:
        return self.ramp.schedule

    def should_update(self, step: int) -> bool:
        """Whether the technique acts after ``step`` optimizer steps: on the ramp's update grid."""
        return self.ramp.should_update(step)
