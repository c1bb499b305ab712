"""GradientClipping on real single-process fits of the reference CNN on the bundled digits.

Each mode is checked against what it promises: ``norm`` and ``value`` clip exactly as Lightning's
``gradient_clip_val`` does; ``agc`` bounds every unit's gradient by its weight norm and leaves the classifier alone;
``adaptive`` clips at the percentile of past norms; a compression event holds the threshold and keeps the shock out
of the history; a non-finite step is skipped with every counter consistent.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from digits_fits import fit
from pytorch_lightning.loggers import CSVLogger
from stabilizer_taps import GradTap, WeightTap, logged

from lightning_compress import GradientClipping, GradualPruning, LearningRateWarmup
from lightning_compress.models import ImageClassifier
from lightning_compress.stabilizers import thresholds

STEPS = 12


def csv_fit(quiet: dict[str, Any], folder: Path, callbacks: list, max_steps: int = STEPS) -> ImageClassifier:
    return fit({**quiet, "logger": CSVLogger(folder, name="csv", version=0), "log_every_n_steps": 1}, callbacks,
               max_steps=max_steps)  # fmt: skip


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module, **tolerance: float) -> None:
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(x, y, msg=lambda m, n=name: f"{n}: {m}", **tolerance)


@pytest.mark.parametrize("accumulate", [1, 3])
def test_norm_mode_clips_as_lightning_gradient_clip_val_does(
    quiet_trainer_kwargs: dict[str, Any], accumulate: int
) -> None:
    """Also under gradient accumulation: once per optimizer step, on the accumulated gradients."""
    quiet = {**quiet_trainer_kwargs, "accumulate_grad_batches": accumulate}
    clip, warmup = GradientClipping("norm", max_norm=0.05), LearningRateWarmup(warmup_steps=4, rewarm_on=[])
    ours = fit(quiet, [clip, warmup], max_steps=STEPS)
    lightning = fit({**quiet, "gradient_clip_val": 0.05}, [LearningRateWarmup(warmup_steps=4, rewarm_on=[])], STEPS)
    unclipped = fit(quiet, [LearningRateWarmup(warmup_steps=4, rewarm_on=[])], max_steps=STEPS)
    assert warmup.applied_steps == STEPS and ours.trainer.global_step == STEPS
    assert_same_weights(ours, lightning, rtol=1e-5, atol=1e-6)
    distance = max(
        float((a - b).abs().max())
        for a, b in zip(ours.state_dict().values(), unclipped.state_dict().values(), strict=True)
    )
    assert distance > 1e-3, "a 0.05 norm clip must change the weights: the comparison above would prove nothing"


def test_value_mode_clips_as_lightning_value_algorithm(quiet_trainer_kwargs: dict[str, Any]) -> None:
    ours = fit(quiet_trainer_kwargs, [GradientClipping("value", max_value=1e-3)], max_steps=STEPS)
    trainer = {**quiet_trainer_kwargs, "gradient_clip_val": 1e-3, "gradient_clip_algorithm": "value"}
    assert_same_weights(ours, fit(trainer, [], max_steps=STEPS), rtol=0, atol=0)


def test_agc_scales_each_unit_to_lambda_times_its_weight_norm() -> None:
    torch.manual_seed(0)
    for shape, unit_dim in (((8, 5), 0), ((4, 3, 3, 3), 0), ((6,), 0), ((5, 8), 1)):
        weight, grad = torch.randn(shape), torch.randn(shape) * 3
        weight.view(-1)[:4] = 0.0  # a unit with a tiny weight norm meets the eps floor
        clipped = grad.clone()
        units = thresholds.agc_(clipped, weight, clip_factor=0.05, eps=1e-3, unit_dim=unit_dim)
        w = weight.movedim(unit_dim, 0).reshape(weight.shape[unit_dim], -1) if weight.dim() > 1 else weight[None]
        g = grad.movedim(unit_dim, 0).reshape(w.shape) if grad.dim() > 1 else grad[None]
        limit = 0.05 * w.norm(dim=1).clamp_min(1e-3)
        expected = torch.where((g.norm(dim=1) > limit)[:, None], g * (limit / g.norm(dim=1))[:, None], g)
        got = clipped.movedim(unit_dim, 0).reshape(w.shape) if grad.dim() > 1 else clipped[None]
        torch.testing.assert_close(got, expected)
        assert units == int((g.norm(dim=1) > limit).sum()) > 0


def test_agc_bounds_every_unit_and_leaves_the_classifier_alone(quiet_trainer_kwargs: dict[str, Any]) -> None:
    before, after = GradTap(), GradTap()
    fit(quiet_trainer_kwargs, [before, GradientClipping("agc", clip_factor=1e-3), after], max_steps=3)
    for pre, post, weights in zip(before.steps, after.steps, before.weights, strict=True):
        for name in ("net.fc2.weight", "net.fc2.bias"):
            assert torch.equal(pre[name], post[name]), f"{name} is the classifier: AGC must leave it alone"
        assert not torch.equal(pre["net.conv1.weight"], post["net.conv1.weight"])
        for name in ("net.conv1.weight", "net.fc1.weight"):
            limit = 1e-3 * thresholds.unit_norms(weights[name]).clamp_min(1e-3)
            assert (thresholds.unit_norms(post[name]) <= limit * (1 + 1e-4)).all(), name


def test_agc_exclude_names_the_parameters_it_leaves_alone(quiet_trainer_kwargs: dict[str, Any]) -> None:
    before, after = GradTap(), GradTap()
    clip = GradientClipping("agc", clip_factor=1e-3, agc_exclude=[r"net\.conv1\..*"])
    fit(quiet_trainer_kwargs, [before, clip, after], max_steps=1)
    assert torch.equal(before.steps[0]["net.conv1.weight"], after.steps[0]["net.conv1.weight"])
    assert not torch.equal(before.steps[0]["net.fc2.weight"], after.steps[0]["net.fc2.weight"])


def test_adaptive_clips_at_the_percentile_of_the_past_norms(
    quiet_trainer_kwargs: dict[str, Any], tmp_path: Path
) -> None:
    before = GradTap()
    csv_fit(quiet_trainer_kwargs, tmp_path, [before, GradientClipping("adaptive", percentile=25, history=4)])
    norms, threshold = logged(tmp_path, "stabilize/grad_norm"), logged(tmp_path, "stabilize/clip_threshold")
    clipped = logged(tmp_path, "stabilize/clipped")
    assert sorted(norms) == list(range(STEPS))
    for step in range(STEPS):
        measured = math.sqrt(sum(float(g.double().square().sum()) for g in before.steps[step].values()))
        assert norms[step] == pytest.approx(measured, rel=1e-6), "grad_norm is the norm before clipping"
        past = [norms[s] for s in range(max(0, step - 4), step)]
        expected = float(np.percentile(past, 25)) if past else math.inf
        assert threshold[step] == pytest.approx(expected, rel=1e-6), f"step {step}"
        assert clipped[step] == float(norms[step] > threshold[step])
    assert 0 < sum(clipped.values()) < STEPS


@pytest.mark.parametrize("pruning_first", [True, False])
def test_a_pruning_jump_holds_the_threshold_and_rebaselines_the_history(
    quiet_trainer_kwargs: dict[str, Any], tmp_path: Path, pruning_first: bool
) -> None:
    """One-shot 90 % pruning at step 8, and a loss shock at step 9: steps 8-11 clip at half the threshold of the
    history before the event, in either order of the callbacks; the history restarts at the event with those steps'
    norms clipped at the held threshold, so the shock enters it at the held value and step 12 reads it alone."""
    clip = GradientClipping("adaptive", percentile=50, history=50, event_steps=4, event_factor=0.5)
    prune = GradualPruning(0.9, start_step=8, end_step=9, schedule="constant")
    callbacks = [prune, clip] if pruning_first else [clip, prune]
    fit({**quiet_trainer_kwargs, "logger": CSVLogger(tmp_path, name="csv", version=0), "log_every_n_steps": 1},
        callbacks, max_steps=14, model=lambda: ScaledLossAt(step=9, factor=50.0))  # fmt: skip
    norms, threshold = logged(tmp_path, "stabilize/grad_norm"), logged(tmp_path, "stabilize/clip_threshold")
    clipped = logged(tmp_path, "stabilize/clipped")
    held = 0.5 * float(np.percentile([norms[s] for s in range(8)], 50))
    assert [threshold[s] for s in range(8, 12)] == pytest.approx([held] * 4, rel=1e-6)
    assert norms[9] > 10 * held and clipped[9] == 1.0, "the shock is clipped at the held threshold"
    rebased = [min(norms[s], held) for s in range(8, 12)]
    assert threshold[12] == pytest.approx(float(np.percentile(rebased, 50)), rel=1e-6)
    assert list(clip.norms) == pytest.approx([*rebased, norms[12], norms[13]], rel=1e-6)
    assert clip.last_event_step == 8 and clip.hold_until == 12


class ScaledLossAt(ImageClassifier):
    """The reference CNN on 8x8 digits whose loss is multiplied by ``factor`` at one optimizer step (a shock)."""

    def __init__(self, step: int, factor: float) -> None:
        super().__init__(image_size=8)
        self.shock_step, self.factor = step, factor

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        return loss * self.factor if self.trainer.global_step == self.shock_step else loss


@pytest.mark.parametrize("skip", [True, False])
def test_a_non_finite_step_is_skipped_and_every_counter_stays_consistent(
    quiet_trainer_kwargs: dict[str, Any], skip: bool
) -> None:
    weights, warmup = WeightTap(), LearningRateWarmup(warmup_steps=10, rewarm_on=[])
    clip = GradientClipping("norm", max_norm=1.0, skip_nonfinite=skip)
    model = fit(quiet_trainer_kwargs, [clip, warmup, weights], max_steps=6, model=lambda: ScaledLossAt(3, float("nan")))
    trainer = model.trainer
    finite = all(torch.isfinite(p).all() for p in model.parameters())
    if not skip:  # negative control: without the guard the NaN step destroys the weights
        assert not finite
        return
    assert finite and trainer.global_step == 6
    for name in weights.steps[2]:
        assert torch.equal(weights.steps[2][name], weights.steps[3][name]), f"{name} changed in the skipped step"
    adam = trainer.optimizers[0].state
    assert {int(state["step"]) for state in adam.values()} == {5}, "Adam counted only the 5 applied steps"
    assert warmup.applied_steps == 5 and clip.skipped_steps == 1
