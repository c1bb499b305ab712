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
    """Zero what each full-shaped boolean mask (True = keep) excludes, everywhere training keeps the parameter.

    Local work only, no communication: each rank multiplies its own copy or shard of the module's parameter and,
    under DeepSpeed, its own fragment of the optimizer's fp32 master copy (an edit of the module alone is undone by
    the next optimizer step). Every rank must call it with the same masks.
    """
    for param, mask in zip(params, masks, strict=True):
        if is_zero3_partitioned(param):
            _mask_zero3_shard(param, mask)
            continue
        param.data.mul_(mask.to(param.device).view_as(param.data))
        mapping = getattr(param, "_hp_mapping", None)  # ZeRO-1/2 (and the bf16 optimizer): this rank's fragment
        if mapping is not None:
            address = mapping.lp_fragment_address
            _mask_fp32_master(param, mask.flatten().narrow(0, address.start, address.numel))


def _mask_zero3_shard(param: nn.Parameter, mask: torch.Tensor) -> None:
    """ZeRO-3 with a full-shaped mask: this rank's shard, and a persistent parameter's whole copy as well."""
    mask_shards_([param], [shard_of(param, mask.to(torch.bool), pad=True)])  # padding stays as it is
    if is_zero3_persistent(param) and param.data.numel() == param.ds_numel:  # whole now: forward reads this copy
        param.data.mul_(mask.to(param.device).view_as(param.data))


def is_zero3_persistent(param: nn.Parameter) -> bool:
    """ZeRO-3 keeps a parameter below ``stage3_param_persistence_threshold`` elements whole on every rank once
    gathered, as well as its shard; that copy is what forward uses (re-gathered after each optimizer step), so an
    edit of the shard alone does not reach forward until the next step."""
    return bool(getattr(param, "ds_persist", False))


def mask_shards_(params: Sequence[nn.Parameter], pieces: Sequence[torch.Tensor]) -> None:
    """ZeRO-3: multiply each rank's own shard of each parameter by ``piece`` (this rank's part of the mask, as
    :func:`shard_of` slices it), in the module's ``ds_tensor`` and in the optimizer's fp32 partition alike. Local."""
    for param, piece in zip(params, pieces, strict=True):
        shard = param.ds_tensor
        shard.data.mul_(piece.view_as(shard).to(shard.device))
        if getattr(param, "_z3_optimizer", None) is not None and param.requires_grad:
            _mask_fp32_master(param, piece)


def mask_local_grads_(params: Sequence[nn.Parameter], pieces: Sequence[torch.Tensor]) -> None:
    """ZeRO-3, between backward and the optimizer step: multiply this rank's gradient partition of each parameter
    by ``piece`` (its part of the mask). Local."""
    from deepspeed.utils import safe_get_local_grad, safe_set_local_grad

    for param, piece in zip(params, pieces, strict=True):
        grad = safe_get_local_grad(param)
        if grad is not None:
            safe_set_local_grad(param, grad.mul_(piece.view_as(grad).to(grad.device)))


def sum_across_ranks(values: Sequence[int], param: nn.Parameter) -> list[int]:
    """ZeRO-3: each of ``values`` summed over the ranks of ``param``'s process group (one collective)."""
    import torch.distributed as dist

    group = param.ds_process_group
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else None
    total = torch.tensor(list(values), dtype=torch.int64, device=device)
    dist.all_reduce(total, group=group)
    return [int(v) for v in total.cpu()]


def shard_range(param: nn.Parameter) -> tuple[int, int, int]:
    """ZeRO-3: ``(start, valid, size)``: this rank holds elements ``[start, start + size)`` of the flattened
    parameter, of which the first ``valid`` exist (the last partition is padded)."""
    import torch.distributed as dist

    size = param.ds_tensor.numel()
    start = size * dist.get_rank(group=param.ds_process_group)
    return start, max(0, min(size, param.ds_numel - start)), size


def shard_of(param: nn.Parameter, value: torch.Tensor, pad: bool | float = 0.0) -> torch.Tensor:
    """ZeRO-3: this rank's part of a full-shaped ``value`` (see :func:`shard_range`), padded with ``pad``."""
    return _zero3_piece(param, value, pad)


def unshard(param: nn.Parameter, piece: torch.Tensor) -> torch.Tensor:
    """ZeRO-3: the full-shaped value whose shards the ranks hold as ``piece`` (collective over the parameter's
    process group: every rank, the same order). Bool pieces travel as bytes."""
    import torch.distributed as dist

    group = param.ds_process_group
    wire = piece.to(torch.uint8) if piece.dtype == torch.bool else piece
    parts = [torch.empty_like(wire) for _ in range(dist.get_world_size(group=group))]
    dist.all_gather(parts, wire.contiguous(), group=group)
    full = torch.cat(parts)[: param.ds_numel].view(full_shape(param))
    return full.to(torch.bool) if piece.dtype == torch.bool else full


def _mask_fp32_master(param: nn.Parameter, piece: torch.Tensor) -> None:
    """Multiply this rank's part of the optimizer's fp32 master copy of ``param`` by ``piece`` (flat, same size)."""
    if is_zero3_partitioned(param):
        from deepspeed.utils import safe_get_local_fp32_param, safe_set_local_fp32_param

        local = safe_get_local_fp32_param(param)  # a view of the partition (no offload), or a copy of it
        safe_set_local_fp32_param(param, local.data.mul_(piece.view_as(local).to(local.device)))
    else:
        fragment = param._hp_mapping.get_hp_fragment()
        fragment.data.mul_(piece.view_as(fragment).to(fragment.device))


def _write_fp32_masters(params: Sequence[nn.Parameter], edit: Callable[[int, torch.Tensor], object]) -> None:
    if not any(has_fp32_master(p) for p in params):
        return
    for i, param in enumerate(params):
        if has_fp32_master(param):
            master = _full_master(param)
            edit(i, master)
            _set_full_master(param, master)


def _set_full_master(param: nn.Parameter, value: torch.Tensor, key: str | None = None) -> None:
    """Write a full value into DeepSpeed's fp32 master copy of ``param`` (``key``: into that optimizer state).

    Under ZeRO-3 each rank writes its own slice through the local setter: DeepSpeed's full-value setter slices past
    the end of a parameter whose size the ranks do not divide (the last partition is padded)."""
    if is_zero3_partitioned(param):
        from deepspeed.utils import safe_set_local_fp32_param, safe_set_local_optimizer_state

        piece = _zero3_piece(param, value)
        if key is None:
            safe_set_local_fp32_param(param, piece)
        else:
            safe_set_local_optimizer_state(param, piece, key)
        return
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    if key is None:
        safe_set_full_fp32_param(param, value)
    else:
        safe_set_full_optimizer_state(param, value, key)


def _zero3_piece(param: nn.Parameter, value: torch.Tensor, pad: bool | float = 0.0) -> torch.Tensor:
    """ZeRO-3: this rank's partition of a full value, elements ``[rank * n, (rank + 1) * n)`` of it flattened, on the
    shard's device; the positions past the value's end (the last partition's padding) hold ``pad``."""
    import torch.distributed as dist

    shard = param.ds_tensor
    size = shard.numel()
    start = size * dist.get_rank(group=param.ds_process_group)
    flat = value.detach().flatten().to(shard.device)
    piece = torch.full((size,), pad, dtype=flat.dtype, device=shard.device)
    valid = max(0, min(size, flat.numel() - start))
    piece[:valid] = flat[start : start + valid]
    return piece


def all_reduce_extrema_(minima: Sequence[torch.Tensor], maxima: Sequence[torch.Tensor]) -> None:
    """In place on every rank: each tensor of ``minima`` becomes its minimum over the ranks, each of ``maxima`` its
    maximum. Two collectives in all (the tensors travel flattened together); a no-op in a single process."""
    import torch.distributed as dist

    if not minima or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    for tensors, op in ((minima, dist.ReduceOp.MIN), (maxima, dist.ReduceOp.MAX)):
        flat = torch.cat([t.detach().flatten() for t in tensors])
        dist.all_reduce(flat, op=op)
        for tensor, part in zip(tensors, torch.split(flat, [t.numel() for t in tensors]), strict=True):
            tensor.data.copy_(part.view_as(tensor))


def full_training_values(params: Sequence[nn.Parameter]) -> list[torch.Tensor]:
    """Full copies of ``params`` as the optimizer holds them: DeepSpeed's fp32 master copy where there is one (the
    module may hold a bf16/fp16 rounding of it), else the module's values. Collective under DeepSpeed."""
    module_values = iter(full_values([p for p in params if not has_fp32_master(p)]))
    return [_full_master(p) if has_fp32_master(p) else next(module_values) for p in params]


def _full_master(param: nn.Parameter) -> torch.Tensor:
    """A full copy of DeepSpeed's fp32 master of ``param`` (collective)."""
    from deepspeed.utils import safe_get_full_fp32_param

    return safe_get_full_fp32_param(param).detach().clone()


def optimizer_state_keys(optimizers: Sequence[torch.optim.Optimizer], param: nn.Parameter) -> list[str]:
    """The names of the per-element state tensors the optimizer keeps for ``param`` (``exp_avg``, ``exp_avg_sq``
    for Adam), the same on every rank. Under DeepSpeed, those of its fp32 partitions."""
    if has_fp32_master(param):
        keys: set[str] = set()
        for optimizer in optimizers:
            inner = getattr(optimizer, "optimizer", optimizer)  # DeepSpeed's ZeRO optimizer wraps a torch one
            for state in inner.state.values():
                keys.update(k for k, v in state.items() if torch.is_tensor(v) and v.dim() >= 1 and v.numel() > 1)
        return sorted(keys)
    for optimizer in optimizers:
        state = optimizer.state.get(param)
        if state:
            return sorted(k for k, v in state.items() if torch.is_tensor(v) and v.shape == param.shape)
    return []


def full_optimizer_state(optimizers: Sequence[torch.optim.Optimizer], param: nn.Parameter, key: str) -> torch.Tensor:
    """The full-shaped optimizer state ``key`` of ``param`` (a copy). Collective under DeepSpeed."""
    if has_fp32_master(param):
        from deepspeed.utils import safe_get_full_optimizer_state

        return safe_get_full_optimizer_state(param, key).detach().clone().view(full_shape(param))
    for optimizer in optimizers:
        if param in optimizer.state and key in optimizer.state[param]:
            return optimizer.state[param][key].detach().clone()
    raise KeyError(f"no optimizer holds state {key!r} for this parameter")


def write_optimizer_state_(
    optimizers: Sequence[torch.optim.Optimizer], param: nn.Parameter, key: str, value: torch.Tensor
) -> None:
    """Set the optimizer state ``key`` of ``param`` to the full-shaped ``value`` (every rank, the same value)."""
    if has_fp32_master(param):
        _set_full_master(param, value, key)
        return
    for optimizer in optimizers:
        if param in optimizer.state and key in optimizer.state[param]:
            optimizer.state[param][key].copy_(value)
            return
    raise KeyError(f"no optimizer holds state {key!r} for this parameter")


# ------------------------------------------------------------------------------------------ gradients under ZeRO


def zero_optimizer(trainer: object) -> object | None:
    """DeepSpeed's ZeRO optimizer of ``trainer`` (stage 1, 2 or 3), which holds the gradients as partitions and
    clips them itself inside ``step()`` at its ``clip_grad``; ``None`` when the gradients live on ``param.grad``
    (no strategy, DDP, DeepSpeed without ZeRO in fp32)."""
    engine = getattr(getattr(trainer, "strategy", None), "model", None)
    stage = getattr(engine, "zero_optimization_stage", None)
    if not callable(stage) or stage() == 0:
        return None
    return engine.optimizer


def engine_grad_norm(trainer: object) -> float:
    """The global gradient norm DeepSpeed measured in its last step, before clipping (``inf`` when it skipped the
    step for non-finite gradients)."""
    norm = trainer.strategy.model.get_global_grad_norm()  # type: ignore[attr-defined]
    return float("nan") if norm is None else float(norm)


def engine_step_applied(trainer: object) -> bool:
    return bool(trainer.strategy.model.was_step_applied())  # type: ignore[attr-defined]


def full_grad(param: nn.Parameter) -> torch.Tensor | None:
    """The full fp32 gradient of ``param`` between backward and the optimizer step, under any strategy; a
    collective under ZeRO (every rank, same order)."""
    if param.grad is not None:
        return param.grad
    from deepspeed.utils import safe_get_full_grad

    grad = safe_get_full_grad(param)
    return None if grad is None else grad.reshape(full_shape(param))


def set_full_grad_(param: nn.Parameter, value: torch.Tensor) -> None:
    """Write a full gradient back where the optimizer step reads it (this rank's partition under ZeRO)."""
    if param.grad is not None:
        param.grad.copy_(value)
    elif is_zero3_partitioned(param):
        from deepspeed.utils import safe_set_local_grad

        safe_set_local_grad(param, _zero3_piece(param, value))
    else:
        from deepspeed.utils import safe_set_full_grad

        safe_set_full_grad(param, value)
