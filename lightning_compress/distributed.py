"""The one home of DeepSpeed and DDP specifics.

Everything else in the project reads and writes full tensors through these helpers and never touches ZeRO
internals. Under ZeRO-3 a parameter outside forward has shape ``(0,)`` and its full shape in ``ds_shape``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence

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


def has_fp32_master(param: torch.Tensor) -> bool:
    """True when a DeepSpeed optimizer keeps its own fp32 copy of ``param`` (ZeRO-1/2/3, bf16 optimizer)."""
    return hasattr(param, "ds_id") or hasattr(param, "_hp_mapping")


def full_values(params: Sequence[nn.Parameter]) -> list[torch.Tensor]:
    """Detached full copies of ``params`` (collective under ZeRO-3: every rank must call it)."""
    with gathered(params):
        return [p.detach().clone() for p in params]


def write_full_(params: Sequence[nn.Parameter], values: Sequence[torch.Tensor]) -> None:
    """Set each parameter to a full value, everywhere training keeps it.

    The module's copy is written (under ZeRO-3 through a gather whose rank-0 edit is re-partitioned), and so is
    DeepSpeed's fp32 master copy: an edit of the module alone is undone by the next optimizer step. Every rank
    must call this with the same values.
    """
    _write_fp32_masters(params, lambda i, master: master.copy_(values[i].to(master)))
    with gathered(params, modifier_rank=0):
        for param, value in zip(params, values, strict=True):
            param.data.copy_(value.to(param.data))


def mask_(params: Sequence[nn.Parameter], masks: Sequence[torch.Tensor]) -> None:
    """Zero what each boolean mask (True = keep) excludes: in the module and in DeepSpeed's fp32 master copy.

    Collective under DeepSpeed (the master copy is read back across ranks): every rank must call it.
    """
    _write_fp32_masters(params, lambda i, master: master.mul_(masks[i].to(master)))
    with gathered(params, modifier_rank=0):
        for param, mask in zip(params, masks, strict=True):
            param.data.mul_(mask.to(param.data.device))


def _write_fp32_masters(params: Sequence[nn.Parameter], edit: Callable[[int, torch.Tensor], object]) -> None:
    if not any(has_fp32_master(p) for p in params):
        return
    from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param

    for i, param in enumerate(params):
        if has_fp32_master(param):
            master = safe_get_full_fp32_param(param)
            edit(i, master)
            safe_set_full_fp32_param(param, master)
