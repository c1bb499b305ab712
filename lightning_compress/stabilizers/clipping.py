"""GradientClipping: norm, value, adaptive (AutoClip) and unit-wise (AGC) clipping that knows compression events.

Where it acts: ``on_before_optimizer_step``, after backward, after AMP's unscaling and once per real optimizer step
under gradient accumulation; under DDP the gradients there are already all-reduced, so every rank clips alike.

Under DeepSpeed ZeRO-1/2/3 ``param.grad`` is ``None`` and each rank holds a partition of the gradients:

- ``norm`` and ``adaptive`` set the threshold of the ZeRO optimizer's own clip (``clip_grad``, read at every
  ``step()``), so the norm DeepSpeed computes anyway does the work at no extra cost; the norm before clipping is read
  back after the step (``engine.get_global_grad_norm()``) for the logs and the history;
- ``value`` and ``agc`` read each parameter's full gradient (and for AGC its fp32 weight) with DeepSpeed's
  ``safe_get_full_grad`` one parameter at a time and write this rank's part back: correct, at the cost of one extra
  all-reduce (ZeRO-1/2) or all-gather (ZeRO-3) of the gradients per step. No rank holds more than one full
  parameter at a time.
- non-finite gradients: DeepSpeed's ZeRO optimizers skip such a step themselves (fp32 and fp16; for bf16 ZeRO-1/2
  ``skip_nonfinite`` turns DeepSpeed's overflow check on).

Around compression events (:mod:`lightning_compress.events`, kinds in ``hold_on``): for ``event_steps`` optimizer
steps after each event the threshold is *held* at its value just before the event, times ``event_factor``. In
``adaptive`` mode the history is re-baselined: it restarts at the event, and the norms of the held steps enter it
clipped at the held threshold. A pruning jump or QAT switching on thus neither passes unclipped (the threshold does
not rise with the shock) nor poisons the statistics read afterwards (a spike enters at the held value, not at its
height), and once the hold ends the percentile describes the changed model, not the one before the event (whose
gradient norms may have been twice as large or half as large).
"""

from __future__ import annotations

import math
import re
from collections import deque
from typing import Any, Literal

import torch
from torch import nn
from typing_extensions import override

from lightning_compress import arguments, distributed
from lightning_compress._lightning import Callback, logs_this_step, pl, rank_zero_info
from lightning_compress.stabilizers import thresholds
from lightning_compress.stabilizers.event_watch import EventWatch, check_kinds
from lightning_compress.stabilizers.trainer_checks import (
    refuse_manual_optimization,
    refuse_other_clipping,
    refuse_twins,
)
from lightning_compress.targeting import weight_is_transposed

Mode = Literal["norm", "value", "agc", "adaptive"]
MODES = ("norm", "value", "agc", "adaptive")


class GradientClipping(Callback):
    """Clip gradients before every optimizer step; hold the threshold after compression events.

    Args:
        mode: ``"norm"`` (global 2-norm at ``max_norm``), ``"value"`` (each element within ``max_value``),
            ``"agc"`` (unit-wise, at ``clip_factor`` times each unit's weight norm) or ``"adaptive"`` (global norm at
            the ``percentile``-th percentile of the last ``history`` norms, AutoClip).
        max_norm: the norm threshold of ``"norm"``.
        max_value: the element threshold of ``"value"``.
        clip_factor: AGC's lambda. Brock et al. use 0.01 at batch 4096 and larger values for smaller batches; the
            default 0.1 suits fine-tuning batches. Measured at batch 128 (``benchmarks/stabilizer_shock.py``): 0.01
            clipped every step, and after a one-shot 99 % prune under Adam it stalled training (the clip level
            follows the weight norms the prune cut, while Adam's second moments remember the old gradient scale).
        eps: AGC's floor on a unit's weight norm (so zero-initialised units can move).
        agc_exclude: regexes (full match) over parameter names that AGC leaves alone. ``None``: the parameters of the
            model's last layer (the classifier), as the paper does; ``[]``: none.
        percentile: ``"adaptive"``: the percentile of past norms used as the threshold, in (0, 100).
        history: ``"adaptive"``: how many past norms the percentile is read from.
        hold_on: the compression event kinds that hold the threshold (``None``: every kind; ``[]``: none).
        event_steps: how many optimizer steps a hold lasts after an event (0: no hold).
        event_factor: the held threshold is the pre-event one times this, in (0, 1].
        skip_nonfinite: skip an optimizer step whose gradients are not finite (NaN or inf). The step is skipped by
            dropping the gradients (``param.grad = None``), so the optimizer changes neither the weights nor its
            moments; ``trainer.global_step`` still advances, as it does for a step AMP skips, and
            ``stabilize/skipped`` logs 1.

    Logs ``stabilize/grad_norm`` (before clipping), ``stabilize/clip_threshold``, ``stabilize/clipped`` (1 when
    clipping changed the step's gradients) and ``stabilize/skipped``.
    """

    def __init__(
        self,
        mode: Mode = "norm",
        max_norm: float = 1.0,
        max_value: float = 1.0,
        clip_factor: float = 0.1,
        eps: float = 1e-3,
        agc_exclude: list[str] | None = None,
        percentile: float = 90.0,
        history: int = 100,
        hold_on: list[str] | None = None,
        event_steps: int = 20,
        event_factor: float = 1.0,
        skip_nonfinite: bool = True,
    ) -> None:
        self.mode: Mode = arguments.choice("mode", mode, MODES, hint=_MODE_HINT)  # type: ignore[assignment]
        self.max_norm = _positive("max_norm", max_norm, "the global 2-norm the gradients are clipped to, e.g. 1.0.")
        self.max_value = _positive("max_value", max_value, "each gradient element is clamped to +-max_value.")
        self.clip_factor = _positive(
            "clip_factor", clip_factor, "AGC's lambda: 0.1 (default) at fine-tuning batches, 0.01 at 4096."
        )
        self.eps = _positive("eps", eps, "AGC's floor on a unit's weight norm, e.g. 1e-3.")
        if agc_exclude is not None and not (
            isinstance(agc_exclude, list) and all(isinstance(p, str) for p in agc_exclude)
        ):
            raise arguments.refusal("agc_exclude", agc_exclude, "a list of regular expressions or None")
        self.agc_exclude = agc_exclude
        self._exclude = [re.compile(p) for p in agc_exclude or []]
        self.percentile = arguments.fraction(
            "percentile", percentile, low=0, high=100, low_open=True, high_open=True,
            hint="AutoClip's percentile of past gradient norms; 90 clips the largest tenth of the steps.",
        )  # fmt: skip
        self.history = arguments.integer("history", history, minimum=1, hint="past norms the percentile reads.")
        self.hold_on = check_kinds("hold_on", hold_on)
        self.event_steps = arguments.integer("event_steps", event_steps, hint="steps a hold lasts; 0 holds nothing.")
        self.event_factor = arguments.fraction(
            "event_factor", event_factor, low_open=True, hint="1.0 holds the pre-event threshold; 0.5 halves it."
        )
        self.skip_nonfinite = arguments.flag("skip_nonfinite", skip_nonfinite)
        # State (saved in checkpoints)
        self.norms: deque[float] = deque(maxlen=self.history)  # adaptive: past norms, oldest first
        self.hold_until = -1  # the first step no longer held
        self.held_threshold = math.inf
        self.last_event_step: int | None = None
        self.skipped_steps = 0
        # Per fit
        self._watch = EventWatch(self.hold_on)
        self._zero: Any = None  # DeepSpeed's ZeRO optimizer when the gradients are partitioned
        self._agc: list[tuple[str, nn.Parameter, int]] = []  # (name, parameter, unit dim)
        self._pending: dict[str, Any] | None = None  # this step's figures, logged at batch end

    @property
    @override
    def state_key(self) -> str:
        settings = {
            "mode": self.mode, "max_norm": self.max_norm, "max_value": self.max_value,
            "clip_factor": self.clip_factor, "percentile": self.percentile, "history": self.history,
        }  # fmt: skip
        return arguments.settings_key(self, settings)

    # ------------------------------------------------------------------------------------------------ policy

    def base_threshold(self) -> float:
        """The threshold outside a hold: the fixed one of the mode, or (adaptive) the percentile of past norms."""
        if self.mode == "adaptive":
            return thresholds.percentile(list(self.norms), self.percentile)
        return {"norm": self.max_norm, "value": self.max_value, "agc": self.clip_factor}[self.mode]

    def threshold(self, step: int) -> float:
        return self.held_threshold if step < self.hold_until else self.base_threshold()

    # ------------------------------------------------------------------------------------------------ hooks

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        refuse_twins(trainer, self)
        refuse_manual_optimization(pl_module, self)
        refuse_other_clipping(trainer)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._watch.start(trainer)
        self._zero = distributed.zero_optimizer(trainer)
        if self._zero is not None and self.mode in ("norm", "adaptive"):
            if not hasattr(self._zero, "clip_grad") or getattr(self._zero, "compute_grad_norm", True) is False:
                raise ValueError(
                    f"GradientClipping(mode={self.mode!r}) sets the clip threshold of DeepSpeed's ZeRO optimizer, and"
                    f" {type(self._zero).__name__} has none (or `compute_grad_norm` is off). HINT: mode='value' or"
                    " 'agc' read the gradients themselves; or turn `zero_optimization.compute_grad_norm` on."
                )
        if self._zero is not None and self.mode in ("value", "agc") and getattr(self._zero, "clip_grad", 0.0):
            rank_zero_info(
                f"GradientClipping(mode={self.mode!r}) turns DeepSpeed's own norm clip off (it was"
                f" {self._zero.clip_grad}): one clipping per step, this one."
            )
            self._zero.clip_grad = 0.0
        if self._zero is not None and self.skip_nonfinite and hasattr(self._zero, "check_grad_overflow"):
            self._zero.check_grad_overflow = True  # bf16 ZeRO-1/2 would otherwise step on a non-finite norm
        if self.mode == "agc":
            self._agc = self._agc_parameters(pl_module)

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        step = trainer.global_step
        self._react(step, trainer)
        threshold = self.threshold(step)
        if self._zero is not None and self.mode in ("norm", "adaptive"):
            self._zero.clip_grad = threshold if math.isfinite(threshold) else 0.0  # DeepSpeed: 0 clips nothing
            self._pending = {"step": step, "threshold": threshold, "norm": None}  # DeepSpeed measures it in step()
            return
        params = [p for p in pl_module.parameters() if p.requires_grad]
        if self.mode in ("value", "agc"):
            norm, clipped = self._clip_each(params, threshold)
        else:
            grads = [p.grad for p in params if p.grad is not None]
            norm = thresholds.global_norm(grads)
            scale = thresholds.norm_scale(norm, threshold) if math.isfinite(norm) else 1.0
            clipped = scale < 1.0
            if clipped:
                torch._foreach_mul_(grads, scale)
        skipped = not math.isfinite(norm) and self.skip_nonfinite
        if skipped and self._zero is None:
            for param in params:
                param.grad = None  # the optimizer steps over parameters without a gradient
        self._record(step, norm, threshold, clipped, skipped)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        pending, self._pending = self._pending, None
        if pending is None:
            return
        if pending["norm"] is None:  # DeepSpeed clipped inside its step: read what it measured
            norm = distributed.engine_grad_norm(trainer)
            skipped = not distributed.engine_step_applied(trainer)
            clipped = math.isfinite(norm) and thresholds.norm_scale(norm, pending["threshold"]) < 1.0
            pending = self._record(pending["step"], norm, pending["threshold"], clipped, skipped)
            self._pending = None  # recorded: the next batch end without a step logs nothing
        if not logs_this_step(trainer):  # logging costs more than clipping itself: only when the loggers write
            return
        figures = {
            "stabilize/grad_norm": pending["norm"],
            "stabilize/clip_threshold": pending["threshold"],
            "stabilize/clipped": float(pending["clipped"]),
            "stabilize/skipped": float(pending["skipped"]),
        }
        pl_module.log_dict(figures, on_step=True, on_epoch=False)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "norms": list(self.norms),
            "hold_until": self.hold_until,
            "held_threshold": self.held_threshold,
            "last_event_step": self.last_event_step,
            "skipped_steps": self.skipped_steps,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.norms = deque(state_dict["norms"], maxlen=self.history)
        self.hold_until = state_dict["hold_until"]
        self.held_threshold = state_dict["held_threshold"]
        self.last_event_step = state_dict["last_event_step"]
        self.skipped_steps = state_dict["skipped_steps"]

    # ------------------------------------------------------------------------------------------------ internals

    def _react(self, step: int, trainer: pl.Trainer) -> None:
        """Start (or extend) a hold at the first step that trains a model changed by a compression event."""
        fresh = self._watch.new_events(trainer)
        if not fresh:
            return
        self.last_event_step = max(event.step for event in fresh)
        if self.event_steps == 0:
            return
        if step >= self.hold_until:  # a new hold; within one, the held threshold stays
            self.held_threshold = self.base_threshold() * self.event_factor
            self.norms.clear()  # re-baseline: after the hold the percentile reads the changed model's norms only
        self.hold_until = step + self.event_steps

    def _record(self, step: int, norm: float, threshold: float, clipped: bool, skipped: bool) -> dict[str, Any]:
        if skipped:
            self.skipped_steps += 1
        elif self.mode == "adaptive" and math.isfinite(norm):
            self.norms.append(min(norm, threshold) if step < self.hold_until else norm)
        self._pending = {"step": step, "threshold": threshold, "norm": norm, "clipped": clipped, "skipped": skipped}
        return self._pending

    def _clip_each(self, params: list[nn.Parameter], threshold: float) -> tuple[float, bool]:
        """``value`` / ``agc``: clip parameter by parameter (one full gradient at a time under ZeRO); returns the
        global norm before clipping and whether anything was clipped. The figures stay on the device until the end:
        one sync per step, not one per parameter."""
        norms: list[torch.Tensor] = []
        clipped: list[torch.Tensor] = []
        units = {id(p): dim for _, p, dim in self._agc}
        for param in params:
            grad = distributed.full_grad(param)  # a collective under ZeRO: every rank, every parameter, in order
            if grad is None:
                continue
            norms.append(torch.linalg.vector_norm(grad.detach()).double())  # as global_norm: per tensor, then f64
            if self.mode == "value":
                clipped.append((grad.abs() > threshold).any())
                grad = grad.clamp_(-threshold, threshold) if self._zero is None else grad.clamp(-threshold, threshold)
            elif id(param) in units:
                weight = distributed.full_training_values([param])[0] if self._zero is not None else param
                grad = grad.clone() if self._zero is not None else grad
                clipped.append(thresholds.agc_(grad, weight, threshold, self.eps, units[id(param)]) > 0)
            else:
                continue
            if self._zero is not None:  # a local write of this rank's part, clipped or not
                distributed.set_full_grad_(param, grad)
        if not norms:
            return 0.0, False
        norm = float(torch.linalg.vector_norm(torch.stack(norms)))
        return norm, bool(torch.stack(clipped).any()) if clipped else False

    def _agc_parameters(self, pl_module: pl.LightningModule) -> list[tuple[str, nn.Parameter, int]]:
        """The parameters AGC clips, with the dimension of their units (1 for a weight stored (in, out))."""
        owners = {
            f"{module_name}.{param_name}" if module_name else param_name: module
            for module_name, module in pl_module.named_modules()
            for param_name, _ in module.named_parameters(recurse=False)
        }
        if self.agc_exclude is None:
            last = [
                name
                for name, module in pl_module.named_modules()
                if next(module.parameters(recurse=False), None) is not None
            ]
            excluded = {n for n, m in owners.items() if last and m is pl_module.get_submodule(last[-1])}
            if excluded:
                rank_zero_info(f"GradientClipping(mode='agc') leaves the last layer alone: {sorted(excluded)}.")
        else:
            excluded = {n for n in owners if any(p.fullmatch(n) for p in self._exclude)}
        chosen = []
        for name, param in pl_module.named_parameters():
            if name in excluded or not param.requires_grad:
                continue
            transposed = name.endswith("weight") and weight_is_transposed(owners[name])
            chosen.append((name, param, 1 if transposed else 0))
        return chosen


_MODE_HINT = (
    "'norm' clips the global norm at max_norm (Lightning's gradient_clip_val), 'value' each element, 'agc' each"
    " unit against its weight norm, 'adaptive' at a percentile of past norms."
)


def _positive(name: str, value: Any, hint: str) -> float:
    number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if number and value > 0:
        return float(value)
    raise arguments.refusal(name, value, "a finite number > 0", hint)
