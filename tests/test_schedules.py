"""Schedules: pure functions of the optimizer step that rise from 0 to the target and change only on the grid."""

from __future__ import annotations

import pytest

from lightning_compress import schedules
from lightning_compress.schedules import SCHEDULES, progress, shape, value_at

START, END, EVERY = 10, 110, 10  # the end lies on the update grid
TARGETS = (0.3, 0.5, 0.9, 0.97, 0.99)


def at(step: int, schedule: str, target: float = 0.9, update_every: int = EVERY, end_step: int = END) -> float:
    return value_at(
        step, schedule=schedule, target=target, start_step=START, end_step=end_step, update_every=update_every
    )


def test_the_four_named_schedules_exist() -> None:
    assert set(SCHEDULES) == {"cubic", "linear", "exponential", "constant"}


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("target", TARGETS)
def test_zero_before_start_and_exactly_the_target_from_end_step_on(schedule: str, target: float) -> None:
    for step in (0, 1, START - 1):
        assert at(step, schedule, target) == 0.0
    for step in (END, END + 1, END + 7, 10 * END):
        assert at(step, schedule, target) == target  # exactly, not approximately


@pytest.mark.parametrize("schedule", ("cubic", "linear", "exponential"))
def test_ramps_start_at_zero_on_start_step(schedule: str) -> None:
    assert at(START, schedule) == 0.0
    assert 0.0 < at(START + EVERY, schedule) < 0.9


def test_constant_jumps_to_the_target_at_start_step() -> None:
    assert at(START - 1, "constant") == 0.0
    assert at(START, "constant") == 0.9


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("update_every", (1, 3, 10))
def test_monotone_non_decreasing_and_within_zero_and_target(schedule: str, update_every: int) -> None:
    values = [at(step, schedule, update_every=update_every) for step in range(END + 20)]
    assert all(b >= a for a, b in zip(values, values[1:], strict=False))
    assert all(0.0 <= v <= 0.9 for v in values)


@pytest.mark.parametrize("target", TARGETS)
def test_cubic_is_zhu_and_gupta(target: float) -> None:
    # s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (n * dt)) ** 3 with s_i = 0, t0 = START, n * dt = END - START
    for step in (START, START + 10, START + 30, START + 50, START + 90):
        expected = target + (0.0 - target) * (1 - (step - START) / (END - START)) ** 3
        assert at(step, "cubic", target) == pytest.approx(expected, abs=1e-12)
    assert at(START + 50, "cubic", target) == pytest.approx(target * (1 - 0.5**3))  # 87.5 % of the way at half time


def test_cubic_prunes_faster_early_than_linear() -> None:
    assert at(START + 20, "cubic") > at(START + 20, "linear")


def test_linear_is_proportional() -> None:
    assert at(START + 50, "linear") == pytest.approx(0.45)
    assert at(START + 20, "linear") == pytest.approx(0.18)


def test_exponential_decays_the_kept_fraction_geometrically() -> None:
    kept = [1 - at(START + k * EVERY, "exponential") for k in range(11)]
    ratios = [b / a for a, b in zip(kept, kept[1:], strict=False)]
    assert ratios == pytest.approx([0.1 ** (1 / 10)] * 10)


@pytest.mark.parametrize("target", (0.3, 0.6, 0.7, 0.9, 0.97, 0.99, 0.999))
def test_exponential_hits_the_target_exactly_at_end_step(target: float) -> None:
    assert at(END, "exponential", target) == target
    assert at(END - 1, "exponential", target, update_every=1) < target


@pytest.mark.parametrize("schedule", ("cubic", "linear", "exponential"))
def test_value_changes_only_on_the_update_grid(schedule: str) -> None:
    grid = {START + k * EVERY for k in range(1, (END - START) // EVERY + 1)}  # at START itself the ramp is at 0
    changes = {step for step in range(1, END + 30) if at(step, schedule) != at(step - 1, schedule)}
    assert changes == grid  # every later grid step changes it (the ramp is strictly rising), and nothing else does
    for step in range(START, END):
        assert at(step, schedule) == at(START + (step - START) // EVERY * EVERY, schedule)


def test_an_end_step_off_the_grid_still_reaches_the_target_on_end_step() -> None:
    end = START + 25  # grid points START, +10, +20; the end at +25 is a change point of its own
    changes = [
        step for step in range(1, end + 10) if at(step, "linear", end_step=end) != at(step - 1, "linear", end_step=end)
    ]
    assert changes == [START + 10, START + 20, end]
    assert at(end - 1, "linear", end_step=end) == pytest.approx(0.9 * 20 / 25)
    assert at(end, "linear", end_step=end) == 0.9


def test_progress_snaps_down_to_the_grid() -> None:
    assert progress(0, 10, 110, 10) == 0.0
    assert progress(19, 10, 110, 10) == 0.0
    assert progress(20, 10, 110, 10) == 0.1
    assert progress(109, 10, 110, 10) == 0.9
    assert progress(110, 10, 110, 10) == 1.0
    assert progress(500, 10, 110, 10) == 1.0


def test_initial_value_is_respected() -> None:
    assert value_at(0, schedule="linear", target=0.9, start_step=5, end_step=15, initial=0.5) == 0.5
    assert value_at(10, schedule="linear", target=0.9, start_step=5, end_step=15, initial=0.5) == pytest.approx(0.7)
    assert value_at(15, schedule="cubic", target=0.9, start_step=5, end_step=15, initial=0.5) == 0.9


def test_unknown_schedule_raises_naming_the_argument_and_choices() -> None:
    with pytest.raises(
        ValueError, match=r"`schedule` must be one of cubic, linear, exponential, constant; got 'quadratic'"
    ):
        shape("quadratic", 0.5, 0.0, 0.9)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="quadratic"):
        value_at(500, schedule="quadratic", target=0.9, start_step=0, end_step=10)  # type: ignore[arg-type]


def test_schedules_are_pure_functions() -> None:
    assert schedules.value_at(42, schedule="cubic", target=0.9, start_step=0, end_step=100, update_every=5) == (
        schedules.value_at(42, schedule="cubic", target=0.9, start_step=0, end_step=100, update_every=5)
    )
