"""A run stopped in the middle of a warm-up, a re-warm and a clipping hold, and resumed from its checkpoint, ends
bitwise equal to the run never stopped: the stabilisers keep what they need of the past (the step of the last event,
the applied steps, the norm history) in their own state, and an event a technique announces again after the resume
(QAT's ``quantize``, marked ``resumed``) starts nothing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from digits_fits import EPOCH_END_STEP, whole_and_resumed

from lightning_compress import (
    GradientClipping,
    GradualPruning,
    LearningRateWarmup,
    QuantizationAwareTraining,
    events,
)
from lightning_compress._lightning import Callback, pl

MAX_STEPS = 30


class EventLog(Callback):
    """The compression events of the fit, as they stood at its end."""

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.events = events.history(trainer)


def test_resume_mid_warmup_mid_rewarm_and_mid_hold_is_bitwise(
    quiet_trainer_kwargs: dict[str, Any], tmp_path: Path
) -> None:
    runs: list[list[Callback]] = []

    def callbacks() -> list[Callback]:
        runs.append([
            LearningRateWarmup(warmup_steps=25, rewarm_on=["masks", "quantize"], rewarm_steps=10, rewarm_factor=0.2),
            GradientClipping("adaptive", percentile=50, history=20, event_steps=8),
            GradualPruning(0.8, start_step=15, end_step=16, schedule="constant"),  # re-warm and hold from 15
            QuantizationAwareTraining(weight_bits=8, activation_bits=8, start_step=12),
            EventLog(),
        ])  # fmt: skip
        return runs[-1]

    whole, resumed = whole_and_resumed(quiet_trainer_kwargs, tmp_path, callbacks, MAX_STEPS)
    (warmup_a, clip_a, *_, log_a), (warmup_b, clip_b, *_, log_b) = runs
    assert warmup_b.rewarm_start == 15 < EPOCH_END_STEP < 15 + 10 and EPOCH_END_STEP < 25, "stopped mid re-warm"
    assert clip_b.hold_until == 23 > EPOCH_END_STEP, "stopped mid hold"
    for name, tensor in whole.state_dict().items():
        assert torch.equal(tensor, resumed.state_dict()[name]), name
    assert warmup_a.state_dict() == warmup_b.state_dict() and clip_a.state_dict() == clip_b.state_dict()
    announced = [e for e in log_b.events if e.kind == events.QUANTIZE]
    assert [(e.step, e.resumed) for e in announced] == [(EPOCH_END_STEP, True)]
    assert [(e.step, e.resumed) for e in log_a.events if e.kind == events.QUANTIZE] == [(12, False)]
