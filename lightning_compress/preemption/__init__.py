"""Surviving preemption: one checkpoint at a step boundary on the scheduler's signal, requeue, exact resume."""

from lightning_compress.preemption.callback import PreemptionCheckpoint
from lightning_compress.preemption.files import CheckpointRefused

__all__ = ["CheckpointRefused", "PreemptionCheckpoint"]
