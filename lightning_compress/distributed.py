"""The one home of DeepSpeed and DDP specifics.

Everything else in the project reads and writes full tensors through these helpers and never touches ZeRO
internals. Under ZeRO-3 a parameter outside forward has shape ``(0,)`` and its full shape in ``ds_shape``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
from torch import nn


def is_zero3_partitioned(param: torch.Tensor) -> bool:
    """True when ``param`` is a ZeRO-3 partitioned parameter (its local data is a shard or empty)."""
    return hasattr(param, "ds_id") and hasattr(param, "ds_shape")


def full_shape(param: torch.Tensor) -> torch.Size:
    """The parameter's logical shape, also when ZeRO-3 holds only a shard of it."""
    return torch.Size(param.ds_shape) if is_zero3_partitioned(param) else param.shape


@contextlib.contextmanager
def gathered(params: Iterable[nn.Parameter], modifier_rank: int | None = None) -> Iterator[None]:
    """Make the full values of ``params`` visible inside the block on every rank.

    A no-op for parameters that are not ZeRO-3 partitioned. With ``modifier_rank=r``, in-place edits made on rank
    ``r`` inside the block are written back to every rank's shard on exit (DeepSpeed's ``GatheredParameters``).
    """
    partitioned = [p for p in params if is_zero3_partitioned(p)]
    if not partitioned:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=modifier_rank):
        yield


def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of ``module.state_dict()`` with full tensors, under any strategy.

    Collective under ZeRO-3: every rank must call it.
    """
    with gathered(list(module.parameters())):
        return {name: tensor.detach().to("cpu", copy=True) for name, tensor in module.state_dict().items()}
