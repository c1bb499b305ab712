"""LearningRateWarmup on real single-process fits: a factor on top of the user's scheduler, applied inside the
optimizer's update only, so closed-form and chainable schedulers both end exactly where they would without it; a
re-warm after the compression events it is told to follow, in either order of the callbacks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from digits_fits import fit
from pytorch_lightning.loggers import CSVLogger
from stabilizer_taps import LrTap, logged

from lightning_compress import GradualPruning, LearningRateWarmup
from lightning_compress.models import ImageClassifier


def test_the_factor_rises_from_one_over_warmup_steps_to_one() -> None:
    linear, cosine = LearningRateWarmup(warmup_steps=4), LearningRateWarmup(warmup_steps=4, shape="cosine")
    assert [linear.lr_factor(s) for s in range(6)] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 1.0])
    assert [cosine.lr_factor(s) for s in range(5)] == pytest.approx([0.14644661, 0.5, 0.85355339, 1.0, 1.0])


def test_a_rewarm_starts_at_rewarm_factor_and_the_smaller_factor_wins_inside_the_warmup() -> None:
    warmup = LearningRateWarmup(warmup_steps=10, rewarm_steps=4, rewarm_factor=0.2)
    warmup.rewarm_start = 8
    assert [warmup.lr_factor(s) for s in range(7, 13)] == pytest.approx([0.8, 0.2, 0.4, 0.6, 0.8, 1.0])


class Scheduled(ImageClassifier):
    """The reference CNN with SGD and a per-step scheduler: ``LambdaLR`` (closed form) or ``StepLR`` (chainable)."""

    def __init__(self, scheduler: str) -> None:
        super().__init__(image_size=8, optimizer="sgd", lr=0.05)
        self.scheduler = scheduler

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)
        if self.scheduler == "lambda":
            scheduler: Any = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1.0 + 0.3 * step))
        else:
            scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.5)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


@pytest.mark.parametrize("scheduler", ["lambda", "step"])
def test_the_update_uses_the_schedulers_lr_times_the_factor_and_the_scheduler_never_sees_it(
    quiet_trainer_kwargs: dict[str, Any], scheduler: str
) -> None:
    plain, warmed = LrTap(), LrTap()
    fit(quiet_trainer_kwargs, [plain], max_steps=8, model=lambda: Scheduled(scheduler))
    warmup = LearningRateWarmup(warmup_steps=5, rewarm_on=[])
    fit(quiet_trainer_kwargs, [warmup, warmed], max_steps=8, model=lambda: Scheduled(scheduler))
    factors = [min(1.0, (s + 1) / 5) for s in range(8)]
    assert warmed.used == pytest.approx([lr * f for lr, f in zip(plain.used, factors, strict=True)], rel=1e-12)
    assert warmed.after_batch == plain.after_batch, "the scheduler's own trajectory is untouched, bit for bit"
    assert len(set(plain.after_batch)) > 2, "the scheduler really changed the lr: the comparison means something"


@pytest.mark.parametrize("pruning_first", [True, False])
def test_a_pruning_jump_starts_a_rewarm_in_the_same_step_in_either_order(
    quiet_trainer_kwargs: dict[str, Any], tmp_path: Path, pruning_first: bool
) -> None:
    warmup = LearningRateWarmup(rewarm_on=["masks"], rewarm_steps=4, rewarm_factor=0.25)
    prune = GradualPruning(0.5, start_step=6, end_step=7, schedule="constant")
    trainer = {"logger": CSVLogger(tmp_path, name="csv", version=0), "log_every_n_steps": 1}
    fit({**quiet_trainer_kwargs, **trainer}, [prune, warmup] if pruning_first else [warmup, prune], max_steps=12)
    factor = logged(tmp_path, "stabilize/lr_factor")
    assert [factor[s] for s in range(12)] == pytest.approx([1.0] * 6 + [0.25, 0.4375, 0.625, 0.8125, 1.0, 1.0])
    assert warmup.last_event_step == 6 and warmup.rewarm_start == 6


def test_events_of_other_kinds_start_no_rewarm(quiet_trainer_kwargs: dict[str, Any]) -> None:
    warmup = LearningRateWarmup(rewarm_on=["quantize"], rewarm_steps=4)
    fit(quiet_trainer_kwargs, [GradualPruning(0.5, start_step=2, end_step=3, schedule="constant"), warmup], 6)
    assert warmup.rewarm_start is None and warmup.last_event_step is None and warmup.applied_steps == 6


def test_by_default_a_warmup_is_only_a_warmup_and_mask_updates_start_no_rewarm(
    quiet_trainer_kwargs: dict[str, Any], tmp_path: Path
) -> None:
    warmup = LearningRateWarmup(warmup_steps=4)
    pruning = GradualPruning(0.5, start_step=2, end_step=10, update_every=2)  # an event every other step
    trainer = {"logger": CSVLogger(tmp_path, name="csv", version=0), "log_every_n_steps": 1}
    fit({**quiet_trainer_kwargs, **trainer}, [pruning, warmup], max_steps=12)
    factor = logged(tmp_path, "stabilize/lr_factor")
    assert [factor[s] for s in range(12)] == pytest.approx([0.25, 0.5, 0.75] + [1.0] * 9)
    assert warmup.rewarm_start is None and warmup.applied_steps == 12


def test_rewarm_on_none_reacts_to_every_kind(quiet_trainer_kwargs: dict[str, Any]) -> None:
    warmup = LearningRateWarmup(rewarm_on=None, rewarm_steps=4)
    fit(quiet_trainer_kwargs, [GradualPruning(0.5, start_step=2, end_step=3, schedule="constant"), warmup], 6)
    assert warmup.rewarm_start == 2 and warmup.last_event_step == 2
