"""Refusals the stabilisers share, raised at ``setup`` before any step: what would make them silently wrong."""

from __future__ import annotations

from typing import Any


def refuse_twins(trainer: Any, callback: Any) -> None:
    """Two callbacks of one stabiliser class in one Trainer would clip twice or compound their factors."""
    twins = [cb for cb in getattr(trainer, "callbacks", []) if type(cb) is type(callback)]
    if len(twins) > 1:
        name = type(callback).__name__
        raise ValueError(
            f"`callbacks` holds {len(twins)} {name} callbacks; one Trainer takes at most one {name}. HINT: keep one"
            " and give it every setting; two would act on the same step twice."
        )


def refuse_manual_optimization(pl_module: Any, callback: Any) -> None:
    """Lightning runs ``on_before_optimizer_step`` only under automatic optimization."""
    if not getattr(pl_module, "automatic_optimization", True):
        raise ValueError(
            f"{type(callback).__name__} needs automatic optimization; {type(pl_module).__name__} sets"
            " `automatic_optimization = False`, under which Lightning calls no `on_before_optimizer_step`. HINT:"
            " clip in your own training_step (self.clip_gradients(...)), or use automatic optimization."
        )


def refuse_other_clipping(trainer: Any) -> None:
    """Lightning's ``gradient_clip_val`` and DeepSpeed's own ``gradient_clipping`` would clip a second time (or be
    silently overridden: GradientClipping sets the ZeRO optimizer's threshold at every step)."""
    clip_val = getattr(trainer, "gradient_clip_val", None)
    if clip_val:
        raise ValueError(
            f"`Trainer(gradient_clip_val={clip_val!r})` and GradientClipping would both clip every step."
            " HINT: drop `gradient_clip_val` (GradientClipping(mode='norm', max_norm=...) does what it did)."
        )
    config = getattr(getattr(trainer, "strategy", None), "config", None)
    deepspeed_clip = config.get("gradient_clipping") if isinstance(config, dict) else None
    if deepspeed_clip:
        raise ValueError(
            f"the DeepSpeed config sets `gradient_clipping: {deepspeed_clip!r}`, and GradientClipping sets the"
            " ZeRO optimizer's clip itself at every step (or turns it off for 'value' and 'agc'): one of them would"
            " be lost. HINT: remove `gradient_clipping` from the DeepSpeed config (or set it to 0);"
            f" GradientClipping(mode='norm', max_norm={deepspeed_clip!r}) does what it did."
        )
