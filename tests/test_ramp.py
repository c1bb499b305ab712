"""StepRamp and the shared argument checks: one set of rules and messages for every callback that ramps."""

from __future__ import annotations

from typing import Any

import pytest

from lightning_compress import GradualPruning, LowRankRefactoring, QuantizationAwareTraining, arguments
from lightning_compress.ramp import StepRamp

RAMPING = {
    "GradualPruning": lambda **ramp: GradualPruning(0.5, **ramp),
    "LowRankRefactoring": lambda **ramp: LowRankRefactoring(rank_ratio=0.5, **ramp),
}


@pytest.mark.parametrize(
    ("ramp", "message"),
    [
        ({}, r"^`end_step` must be an integer step after `start_step`=0; got None\. HINT: for a one-shot change"),
        ({"end_step": True}, r"^`end_step` must be an integer step after `start_step`=0; got True\."),
        ({"start_step": 5, "end_step": 5}, r"^`end_step` must be greater than `start_step`: got end_step=5, start"),
        ({"start_step": -1, "end_step": 5}, r"^`start_step` must be an integer >= 0; got -1\. HINT"),
        ({"start_step": 1.0, "end_step": 5}, r"^`start_step` must be an integer >= 0; got 1\.0\."),
        ({"end_step": 5, "update_every": 0}, r"^`update_every` must be an integer >= 1; got 0\. HINT"),
        ({"end_step": 5, "update_every": True}, r"^`update_every` must be an integer >= 1; got True\."),
        ({"end_step": 5, "schedule": "fast"}, r"^`schedule` must be one of cubic, linear, exponential, constant; got"),
    ],
)
@pytest.mark.parametrize("technique", RAMPING)
def test_every_ramping_technique_refuses_a_bad_ramp_with_the_same_words(
    technique: str, ramp: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        StepRamp(**ramp)
    with pytest.raises(ValueError, match=message):
        RAMPING[technique](**ramp)


def test_the_update_grid_runs_from_start_every_update_every_and_includes_the_end() -> None:
    ramp = StepRamp(start_step=3, end_step=12, update_every=4)
    assert [step for step in range(20) if ramp.should_update(step)] == [3, 7, 11, 12]


def test_values_hold_between_grid_points_and_reach_the_target_exactly_at_the_end() -> None:
    ramp = StepRamp(start_step=0, end_step=10, update_every=5, schedule="linear")
    assert [ramp.value_at(step, 0.8) for step in (0, 4, 5, 9, 10, 50)] == [0.0, 0.0, 0.4, 0.4, 0.8, 0.8]


@pytest.mark.parametrize("technique", RAMPING)
def test_a_technique_reads_its_ramp_settings_as_its_own_attributes(technique: str) -> None:
    callback = RAMPING[technique](start_step=2, end_step=9, update_every=3, schedule="linear")
    assert callback.ramp == StepRamp(start_step=2, end_step=9, update_every=3, schedule="linear")
    assert (callback.start_step, callback.end_step, callback.update_every, callback.schedule) == (2, 9, 3, "linear")
    assert [step for step in range(12) if callback.should_update(step)] == [2, 5, 8, 9]


@pytest.mark.parametrize(
    "build",
    [
        lambda: GradualPruning(0.5, 0, 10),
        lambda: LowRankRefactoring(0.5, None, None, 0, 10),
        lambda: QuantizationAwareTraining(8, 8, 0),
    ],
)
def test_arguments_after_the_first_ones_are_keyword_only(build: Any) -> None:
    with pytest.raises(TypeError, match="positional argument"):
        build()


BASES: dict[str, tuple[Any, dict[str, Any]]] = {
    "GradualPruning": (GradualPruning, {"target_sparsity": 0.5, "end_step": 10}),
    "LowRankRefactoring": (LowRankRefactoring, {"rank_ratio": 0.5, "start_step": 4, "end_step": 10}),
    "QuantizationAwareTraining": (QuantizationAwareTraining, {"start_step": 2}),
}
VARIANTS: list[tuple[str, dict[str, Any]]] = [
    ("GradualPruning", {"target_sparsity": 0.6}),
    ("GradualPruning", {"start_step": 1}),
    ("GradualPruning", {"end_step": 11}),
    ("GradualPruning", {"update_every": 3}),
    ("GradualPruning", {"schedule": "linear"}),
    ("GradualPruning", {"pattern": "channel"}),
    ("GradualPruning", {"scope": "layer"}),
    ("GradualPruning", {"include": ["net.fc1"]}),
    ("GradualPruning", {"exclude": ["net.fc2"]}),
    ("GradualPruning", {"rewind_step": 0}),
    ("LowRankRefactoring", {"rank_ratio": 0.25}),
    ("LowRankRefactoring", {"rank_ratio": None, "energy": 0.5}),
    ("LowRankRefactoring", {"rank_ratio": None, "param_budget": 0.5}),
    ("LowRankRefactoring", {"start_step": 5}),
    ("LowRankRefactoring", {"end_step": 11}),
    ("LowRankRefactoring", {"update_every": 3}),
    ("LowRankRefactoring", {"schedule": "constant"}),
    ("LowRankRefactoring", {"include": ["net.fc1"]}),
    ("LowRankRefactoring", {"exclude": ["net.fc2"]}),
    ("LowRankRefactoring", {"min_saving": 0.2}),
    ("LowRankRefactoring", {"calibration_steps": 2}),
    ("QuantizationAwareTraining", {"weight_bits": 4}),
    ("QuantizationAwareTraining", {"activation_bits": 8}),
    ("QuantizationAwareTraining", {"start_step": 3}),
    ("QuantizationAwareTraining", {"freeze_observers_step": 5}),
    ("QuantizationAwareTraining", {"freeze_bn_step": 5}),
    ("QuantizationAwareTraining", {"include": ["net.fc1"]}),
    ("QuantizationAwareTraining", {"exclude": ["net.fc2"]}),
    ("QuantizationAwareTraining", {"weight_group_size": 32}),
    ("QuantizationAwareTraining", {"learnable_scales": True}),
]


@pytest.mark.parametrize(("technique", "change"), VARIANTS, ids=[f"{t}-{next(iter(c))}" for t, c in VARIANTS])
def test_two_instances_that_differ_in_any_setting_have_different_state_keys(
    technique: str, change: dict[str, Any]
) -> None:
    cls, base = BASES[technique]
    assert cls(**base).state_key == cls(**base).state_key  # a resumed run finds its own state
    assert cls(**{**base, **change}).state_key != cls(**base).state_key


@pytest.mark.parametrize(
    ("technique", "change"),
    [
        ("GradualPruning", {"log_per_layer": False}),
        ("LowRankRefactoring", {"truncate_at_fit_end": False}),
        ("QuantizationAwareTraining", {"export_path": "int8.safetensors"}),
        ("QuantizationAwareTraining", {"convert_at_fit_end": False}),
    ],
)
def test_where_a_technique_logs_or_writes_is_not_part_of_its_identity(technique: str, change: dict[str, Any]) -> None:
    cls, base = BASES[technique]
    assert cls(**{**base, **change}).state_key == cls(**base).state_key


@pytest.mark.parametrize(
    ("check", "value", "message"),
    [
        (lambda v: arguments.integer("n", v, minimum=1), 0, r"^`n` must be an integer >= 1; got 0\.$"),
        (lambda v: arguments.integer("n", v, minimum=2, maximum=8), 9, r"^`n` must be an integer from 2 to 8; got 9"),
        (lambda v: arguments.integer("n", v, allow_none=True), "3", r"^`n` must be an integer >= 0 or None; got '3'"),
        (lambda v: arguments.fraction("f", v, high_open=True), 1.0, r"^`f` must be a number in \[0, 1\); got 1\.0"),
        (lambda v: arguments.fraction("f", v, low_open=True), False, r"^`f` must be a number in \(0, 1\]; got False"),
        (lambda v: arguments.flag("b", v), 1, r"^`b` must be True or False; got 1\.$"),
        (
            lambda v: arguments.choice("c", v, ("x", "y"), hint="x."),
            "z",
            r"^`c` must be one of x, y; got 'z'\. HINT: x",
        ),
        (lambda v: arguments.step("s", v, after=("t", 4)), 3, r"^`s` must be an integer step >= `t`=4; got 3\."),
    ],
)
def test_shared_checks_refuse_in_one_shape(check: Any, value: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check(value)


def test_shared_checks_return_what_they_accept() -> None:
    assert arguments.fraction("f", 1, low_open=True) == 1.0 and isinstance(arguments.fraction("f", 1), float)
    assert arguments.integer("n", None, allow_none=True) is None
    assert arguments.exactly_one({"a": None, "b": 2}) == ("b", 2)
    with pytest.raises(ValueError, match=r"^Give exactly one of `a` and `b`; got a=1, b=2\."):
        arguments.exactly_one({"a": 1, "b": 2})
