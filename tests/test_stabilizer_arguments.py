"""Bad input to the stabilisers: a clear error naming the argument, the value and what is valid, raised at
construction or at setup, before any optimizer step."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch
from digits_fits import fit

from lightning_compress import GradientClipping, LearningRateWarmup, events
from lightning_compress.models import ImageClassifier


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"mode": "l2"}, "`mode` must be one of norm, value, agc, adaptive; got 'l2'"),
        ({"mode": "adaptive", "percentile": 0}, r"`percentile` must be a number in \(0, 100\); got 0"),
        ({"mode": "adaptive", "percentile": 100}, r"`percentile` must be a number in \(0, 100\); got 100"),
        ({"percentile": 150.0}, r"`percentile` must be a number in \(0, 100\); got 150.0"),
        ({"max_norm": 0}, "`max_norm` must be a finite number > 0; got 0"),
        ({"max_value": float("inf")}, "`max_value` must be a finite number > 0; got inf"),
        ({"clip_factor": -0.01}, "`clip_factor` must be a finite number > 0; got -0.01"),
        ({"history": 0}, "`history` must be an integer >= 1; got 0"),
        ({"event_steps": -1}, "`event_steps` must be an integer >= 0; got -1"),
        ({"event_factor": 0.0}, r"`event_factor` must be a number in \(0, 1\]; got 0.0"),
        ({"hold_on": ["prune"]}, "`hold_on` must be a list of the event kinds masks, quantize, lowrank; got"),
        ({"hold_on": "masks"}, "`hold_on` must be a list of event kinds"),
        ({"agc_exclude": "fc2"}, "`agc_exclude` must be a list of regular expressions or None; got 'fc2'"),
        ({"skip_nonfinite": 1}, "`skip_nonfinite` must be True or False; got 1"),
    ],
)
def test_gradient_clipping_refuses_bad_arguments(arguments: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        GradientClipping(**arguments)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"warmup_steps": -5}, "`warmup_steps` must be an integer >= 0; got -5"),
        ({"warmup_steps": 10, "shape": "exp"}, "`shape` must be one of linear, cosine; got 'exp'"),
        ({"rewarm_on": ["masks", "prune"]}, "`rewarm_on` must be a list of the event kinds .*'prune' is not one"),
        ({"rewarm_factor": 0}, r"`rewarm_factor` must be a number in \(0, 1\]; got 0"),
        ({"rewarm_factor": 1.5}, r"`rewarm_factor` must be a number in \(0, 1\]; got 1.5"),
        ({"rewarm_steps": -1}, "`rewarm_steps` must be an integer >= 0; got -1"),
        ({"warmup_steps": 0, "rewarm_steps": 0}, "would never change the learning rate"),
        ({"warmup_steps": 0, "rewarm_on": []}, "would never change the learning rate"),
    ],
)
def test_learning_rate_warmup_refuses_bad_arguments(arguments: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LearningRateWarmup(**arguments)


class ManualOptimization(ImageClassifier):
    def __init__(self) -> None:
        super().__init__(image_size=8)
        self.automatic_optimization = False


@pytest.mark.parametrize(
    ("callbacks", "trainer", "model", "message"),
    [
        (lambda: [GradientClipping()], {"gradient_clip_val": 1.0}, None,
         r"`Trainer\(gradient_clip_val=1.0\)` and GradientClipping would both clip every step"),
        (lambda: [GradientClipping(), GradientClipping("agc")], {}, None,
         "`callbacks` holds 2 GradientClipping callbacks; one Trainer takes at most one GradientClipping"),
        (lambda: [LearningRateWarmup(5), LearningRateWarmup(9)], {}, None,
         "`callbacks` holds 2 LearningRateWarmup callbacks"),
        (lambda: [GradientClipping()], {}, ManualOptimization,
         "GradientClipping needs automatic optimization; ManualOptimization sets `automatic_optimization = False`"),
        (lambda: [LearningRateWarmup(5)], {}, ManualOptimization, "LearningRateWarmup needs automatic optimization"),
    ],
)  # fmt: skip
def test_a_trainer_the_stabilisers_cannot_serve_is_refused_before_any_step(
    quiet_trainer_kwargs: dict[str, Any], callbacks: Any, trainer: dict[str, Any], model: Any, message: str
) -> None:
    built: list[ImageClassifier] = []

    def make() -> ImageClassifier:
        built.append((model or (lambda: ImageClassifier(image_size=8)))())
        built.append({k: v.clone() for k, v in built[0].state_dict().items()})
        return built[0]

    with pytest.raises(ValueError, match=message):
        fit(quiet_trainer_kwargs, callbacks(), max_steps=3, model=make, **trainer)
    assert built[0].trainer.global_step == 0
    assert all(torch.equal(v, built[1][k]) for k, v in built[0].state_dict().items())


class StandInTrainer:
    """A trainer holding only a strategy."""

    def __init__(self, strategy: Any) -> None:
        self.strategy = strategy


def test_a_zero_optimizer_without_its_own_clip_is_refused_for_norm_modes() -> None:
    """DeepSpeed with ``compute_grad_norm`` off has no norm to clip at: refused when the engine exists."""
    optimizer = SimpleNamespace(clip_grad=0.0, compute_grad_norm=False)
    engine = SimpleNamespace(zero_optimization_stage=lambda: 2, optimizer=optimizer)
    trainer = StandInTrainer(strategy=SimpleNamespace(model=engine))
    with pytest.raises(ValueError, match="mode='value' or 'agc' read the gradients themselves"):
        GradientClipping("adaptive").on_fit_start(trainer, None)
    GradientClipping("value").on_fit_start(trainer, None)  # reads the gradients itself: accepted


def test_an_unknown_event_kind_cannot_be_published() -> None:
    with pytest.raises(ValueError, match="unknown compression event kind 'prune'; the kinds are masks, quantize"):
        events.publish(object(), events.CompressionEvent(0, "x", "prune"))


@pytest.mark.parametrize("clip", [1.0, 0.0])
def test_a_deepspeed_config_that_clips_itself_is_refused_at_setup(clip: float) -> None:
    """GradientClipping sets the ZeRO optimizer's threshold at every step: the config's own clip would be lost."""
    pytest.importorskip("deepspeed")
    from pytorch_lightning.strategies import DeepSpeedStrategy

    config = {"zero_optimization": {"stage": 2}, "gradient_clipping": clip, "train_micro_batch_size_per_gpu": 1}
    trainer = StandInTrainer(strategy=DeepSpeedStrategy(config=config))
    clipping = GradientClipping("adaptive")
    if clip:
        with pytest.raises(ValueError, match=r"the DeepSpeed config sets `gradient_clipping: 1.0`.*max_norm=1.0"):
            clipping.setup(trainer, ImageClassifier(image_size=8), "fit")
    else:
        clipping.setup(trainer, ImageClassifier(image_size=8), "fit")  # 0 clips nothing: accepted
