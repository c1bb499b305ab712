"""LearningRateWarmup: a multiplicative warm-up of the learning rate on top of the user's own scheduler, and a
re-warm after compression events.

The factor is applied just before the optimizer's update and undone just after it (torch's optimizer step pre- and
post-hooks, on the innermost torch optimizer: under DeepSpeed the one its ZeRO optimizer wraps). The scheduler
therefore never sees it: closed-form schedulers (``LambdaLR``, transformers' ``get_linear_schedule_with_warmup``),
which recompute ``lr`` from ``base_lrs``, and chainable ones (``StepLR``, ``ExponentialLR``), which multiply the
current ``lr``, both stay exactly what they would be without this callback. A step that AMP or DeepSpeed skips calls
no hook, so nothing is applied or left behind.

The warm-up counts *applied* optimizer steps: a step skipped by ``GradientClipping(skip_nonfinite=True)`` (no
gradients reach the optimizer), by AMP's scaler or by a DeepSpeed overflow does not advance it.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Sequence
from typing import Any, Literal

import torch
from typing_extensions import override

from lightning_compress import arguments
from lightning_compress._lightning import Callback, logs_this_step, pl
from lightning_compress.stabilizers.event_watch import EventWatch, check_kinds
from lightning_compress.stabilizers.trainer_checks import refuse_manual_optimization, refuse_twins

Shape = Literal["linear", "cosine"]
SHAPES = ("linear", "cosine")


class LearningRateWarmup(Callback):
    """Warm the learning rate up over the first ``warmup_steps`` applied steps, and again after compression events.

    Args:
        warmup_steps: applied optimizer steps of the initial warm-up (0: none). The factor rises from
            ``1 / warmup_steps`` at the first step to 1 at step ``warmup_steps``.
        shape: ``"linear"`` or ``"cosine"`` (half a cosine: slow start, slow finish), for warm-up and re-warm alike.
        rewarm_on: the compression event kinds that start a re-warm; default none (a plain warm-up), ``None``:
            every kind. The kinds are those of :mod:`lightning_compress.events`: ``masks`` (pruning), ``quantize``
            (QAT switched on), ``lowrank`` (ranks cut). Re-warming is opt-in because gradual pruning publishes a
            ``masks`` event at every mask update: with ``update_every`` below ``rewarm_steps`` the learning rate
            would stay low for the whole ramp. Name the one-shot events (``quantize``, a one-shot prune or cut), or
            keep ``rewarm_steps`` below ``update_every``.
        rewarm_steps: applied steps a re-warm lasts (0: no re-warm).
        rewarm_factor: the factor at the first step after an event, in (0, 1]; it rises to 1 over ``rewarm_steps``.

    Where a warm-up and a re-warm overlap, the smaller factor wins. Logs ``stabilize/lr_factor``.
    """

    def __init__(
        self,
        warmup_steps: int = 0,
        shape: Shape = "linear",
        rewarm_on: Sequence[str] | None = (),
        rewarm_steps: int = 100,
        rewarm_factor: float = 0.1,
    ) -> None:
        self.warmup_steps = arguments.integer("warmup_steps", warmup_steps, hint="applied optimizer steps; 0: none.")
        self.shape: Shape = arguments.choice("shape", shape, SHAPES, hint=_SHAPE_HINT)  # type: ignore[assignment]
        self.rewarm_on = check_kinds("rewarm_on", rewarm_on)
        self.rewarm_steps = arguments.integer("rewarm_steps", rewarm_steps, hint="applied steps; 0: no re-warm.")
        self.rewarm_factor = arguments.fraction(
            "rewarm_factor", rewarm_factor, low_open=True,
            hint="the learning-rate factor just after an event, e.g. 0.1; 1.0 means no re-warm.",
        )  # fmt: skip
        if self.warmup_steps == 0 and (self.rewarm_steps == 0 or not self.rewarm_on):
            raise ValueError(
                f"LearningRateWarmup(warmup_steps=0, rewarm_steps={self.rewarm_steps},"
                f" rewarm_on={list(self.rewarm_on)}) would never change the learning rate. HINT: give"
                " warmup_steps > 0, or rewarm_steps > 0 with event kinds in rewarm_on."
            )
        # State (saved in checkpoints)
        self.applied_steps = 0
        self.rewarm_start: int | None = None  # applied_steps when the last re-warm began
        self.last_event_step: int | None = None
        # Per fit
        self._watch = EventWatch(self.rewarm_on)
        self._trainer: weakref.ref[Any] | None = None
        self._handles: list[Any] = []
        self._saved: list[float] | None = None  # the scheduler's lr of each group, while the factor is on
        self._applied = False  # an update with gradients ran in this step
        self._used: float | None = None  # the factor of this step, logged at batch end

    @property
    @override
    def state_key(self) -> str:
        settings = {
            "warmup_steps": self.warmup_steps, "shape": self.shape, "rewarm_on": list(self.rewarm_on),
            "rewarm_steps": self.rewarm_steps, "rewarm_factor": self.rewarm_factor,
        }  # fmt: skip
        return arguments.settings_key(self, settings)

    # ------------------------------------------------------------------------------------------------ policy

    def lr_factor(self, applied_steps: int) -> float:
        """The factor on the scheduler's learning rate for the update after ``applied_steps`` applied steps."""
        factor = 1.0
        if applied_steps < self.warmup_steps:
            factor = _rise(self.shape, (applied_steps + 1) / self.warmup_steps)
        if self.rewarm_start is not None and 0 <= applied_steps - self.rewarm_start < self.rewarm_steps:
            progress = (applied_steps - self.rewarm_start) / self.rewarm_steps
            factor = min(factor, self.rewarm_factor + (1.0 - self.rewarm_factor) * _rise(self.shape, progress))
        return factor

    # ------------------------------------------------------------------------------------------------ hooks

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            refuse_twins(trainer, self)
            refuse_manual_optimization(pl_module, self)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._trainer = weakref.ref(trainer)
        self._watch.start(trainer)
        self._remove_hooks()
        for optimizer in trainer.optimizers:
            inner = _innermost(optimizer)
            self._handles += [inner.register_step_pre_hook(self._before_update),
                              inner.register_step_post_hook(self._after_update)]  # fmt: skip

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._applied:
            self.applied_steps += 1
            self._applied = False
        if self._used is not None and logs_this_step(trainer):
            pl_module.log("stabilize/lr_factor", self._used, on_step=True, on_epoch=False)
        self._used = None

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove_hooks()

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._remove_hooks()

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "applied_steps": self.applied_steps,
            "rewarm_start": self.rewarm_start,
            "last_event_step": self.last_event_step,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.applied_steps = state_dict["applied_steps"]
        self.rewarm_start = state_dict["rewarm_start"]
        self.last_event_step = state_dict["last_event_step"]

    # ------------------------------------------------------------------------------------------------ internals

    def _before_update(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        trainer = self._trainer() if self._trainer is not None else None
        fresh = self._watch.new_events(trainer) if trainer is not None else []
        if fresh and self.rewarm_steps:
            self.rewarm_start = self.applied_steps
            self.last_event_step = max(event.step for event in fresh)
        factor = self.lr_factor(self.applied_steps)
        self._used = factor
        self._saved = [group["lr"] for group in optimizer.param_groups]
        if factor != 1.0:
            for group in optimizer.param_groups:
                group["lr"] = group["lr"] * factor

    def _after_update(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self._saved is not None:
            for group, lr in zip(optimizer.param_groups, self._saved, strict=True):
                group["lr"] = lr
            self._saved = None
        self._applied = self._applied or any(p.grad is not None for g in optimizer.param_groups for p in g["params"])

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


_SHAPE_HINT = "'linear' rises evenly; 'cosine' (half a cosine) starts and ends gently."


def _rise(shape: str, progress: float) -> float:
    """From 0 at ``progress`` 0 to 1 at 1, along ``shape``."""
    progress = min(max(progress, 0.0), 1.0)
    return progress if shape == "linear" else 0.5 * (1.0 - math.cos(math.pi * progress))


def _innermost(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer that updates the weights: under DeepSpeed the one its ZeRO optimizer wraps."""
    inner = optimizer
    while not isinstance(inner, torch.optim.Optimizer) and hasattr(inner, "optimizer"):
        inner = inner.optimizer
    if not isinstance(inner, torch.optim.Optimizer):
        raise TypeError(
            f"LearningRateWarmup found no torch optimizer inside {type(optimizer).__name__}. HINT: it needs a"
            " torch.optim.Optimizer (directly, or wrapped by DeepSpeed) to scale its learning rate around each step."
        )
    return inner
