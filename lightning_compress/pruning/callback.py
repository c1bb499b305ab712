"""GradualPruning: magnitude pruning on a schedule, exact on resume, intact under DDP and DeepSpeed ZeRO-1/2/3."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any, Literal

import torch
from torch import nn
from typing_extensions import override

from lightning_compress import arguments, composition, distributed, events, packing, teardown
from lightning_compress._lightning import Callback, logs_this_step, pl
from lightning_compress.pruning import sharded
from lightning_compress.pruning.patterns import SCOPES, Pattern, Scope, compute_masks
from lightning_compress.ramp import Ramped, StepRamp
from lightning_compress.schedules import ScheduleName
from lightning_compress.targeting import Targeting, weight_is_transposed


class GradualPruning(composition.Composable, Ramped, Callback):
    r"""Prune the targeted Linear/Conv weights from 0 to ``target_sparsity`` between ``start_step`` and ``end_step``.

    Targets ``nn.Linear``, ``nn.Conv1d/2d/3d`` and transformers' ``Conv1D`` (GPT-2; its weight is stored
    ``(in, out)``, and channels and N:M groups are taken along the same dimensions as for a Linear). Tied weights
    are left out (see :mod:`lightning_compress.targeting`).

    Every ``update_every`` optimizer steps the masks are recomputed from the current weights (magnitude for
    ``unstructured`` and ``N:M``, row L2 norm for ``channel``) at the sparsity the named ``schedule`` gives for
    that step (Zhu & Gupta's ``cubic`` by default); after every optimizer step the masked weights are set to exactly
    zero, in the module and in DeepSpeed's fp32 master copy, so momentum cannot revive them.

    While it trains, the gradient of each pruned weight is zeroed as backward computes it (a tensor hook, before
    DDP's all-reduce and DeepSpeed's partitioning): gradient clipping, the logged gradient norms and the
    optimizer's moments see the live weights only. Without it, a 99 % prune leaves 99 % of the gradient norm on
    weights that are set back to zero after the step, and a global-norm or unit-wise (AGC) clip scales the live
    weights' updates down by it. No reparametrisation: the hooks go at fit end, and the module stays a plain
    module, deep-copyable and ready for export.

    Under DeepSpeed ZeRO-3 no rank holds the whole model, and pruning keeps it so: each rank keeps the masks of its
    own shard of each weight (``masks`` then holds those shards; :meth:`full_masks` puts them together), computes
    them without gathering the model (:mod:`lightning_compress.pruning.sharded`: the same masks the gathered weights
    give), and masks its own gradient partitions after backward instead of the full gradients during it. The
    checkpoint holds the full masks, packed 8 to a byte, whatever the strategy or the number of ranks.

    Args:
        target_sparsity: fraction of the targeted weights that are zero from ``end_step`` on, in [0, 1).
            For an ``N:M`` pattern it is implied (1 - N/M) and may be omitted.
        start_step: optimizer step (``trainer.global_step``) at which pruning starts.
        end_step: step at which the target is reached; it holds after.
        update_every: steps between mask updates.
        schedule: ``cubic``, ``linear``, ``exponential`` or ``constant`` (all at once at ``start_step``).
        pattern: ``unstructured``, ``channel`` or ``N:M`` such as ``2:4``.
        scope: ``global`` (one ranking across the targeted layers) or ``layer`` (each layer reaches the target).
            Default: ``layer`` for ``channel`` (channel norms of layers of different widths do not compare),
            ``global`` otherwise.
        include: regular expressions for qualified module names to prune (whole-name match); default all.
        exclude: regular expressions for module names to leave dense (e.g. the classifier head).
        rewind_step: lottery-ticket rewinding: the surviving weights are reset to their values at this step once
            the final masks are set at ``end_step``. ``None`` (default) keeps the trained values.
        log_per_layer: also log ``compress/sparsity/<layer>`` for each pruned layer.
    """

    def __init__(
        self,
        target_sparsity: float | None = None,
        *,
        start_step: int = 0,
        end_step: int | None = None,
        update_every: int = 10,
        schedule: ScheduleName = "cubic",
        pattern: str = "unstructured",
        scope: Literal["global", "layer"] | None = None,
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        rewind_step: int | None = None,
        log_per_layer: bool = True,
    ) -> None:
        self.pattern = Pattern.parse(pattern)
        self.target_sparsity = _check_target(target_sparsity, self.pattern)
        self.ramp = StepRamp(start_step=start_step, end_step=end_step, update_every=update_every, schedule=schedule)
        if rewind_step is not None and not (arguments.is_integer(rewind_step) and 0 <= rewind_step < end_step):
            raise arguments.refusal(
                "rewind_step",
                rewind_step,
                f"an integer in [0, end_step={end_step}) or None",
                "the step whose weights the survivors return to once the final masks are set, e.g. 0.",
            )
        scope = self.pattern.scopes[0] if scope is None else arguments.choice("scope", scope, SCOPES)
        self.pattern.check_scope(scope)
        self.scope: Scope = scope
        self.targeting = Targeting.from_arguments(include, exclude, transformers_conv1d=True)
        self.include, self.exclude = include, exclude
        self.rewind_step = rewind_step
        self.log_per_layer = arguments.flag("log_per_layer", log_per_layer)
        # State (saved in checkpoints): the masks by parameter name, the sparsity they were built for, the step
        # last masked, and the weights to rewind to.
        self.masks: dict[str, torch.Tensor] = {}  # by parameter name; under ZeRO-3 this rank's shard of each
        self.mask_sparsity = 0.0
        self.last_step = -1
        self.rewind_values: dict[str, torch.Tensor] = {}
        self._targets: dict[str, str] = {}  # weight parameter name -> module name
        self._transposed: set[str] = set()  # weight names stored (in, out): masks are computed on their transpose
        self._params: dict[str, nn.Parameter] = {}
        self._prepared_for: nn.Module | None = None
        self._sharded = False  # ZeRO-3: masks are this rank's shards
        self._saved_masks: dict[str, Any] = {}  # as loaded from a checkpoint, until the parameters are known
        self._zeros: dict[str, int] = {}  # pruned entries of each masked parameter (all ranks together)
        self._multipliers: tuple[dict[str, torch.Tensor], list[str], list[torch.Tensor]] | None = None
        self._grad_hooks: list[Any] = []  # removable handles of the gradient-masking hooks, while fit runs
        self._grad_multipliers: dict[tuple[str, torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    @override
    def state_key(self) -> str:
        """Every setting that changes which weights are pruned when: two that differ coexist in one Trainer."""
        settings = {
            "target_sparsity": self.target_sparsity,
            "ramp": self.ramp,
            "pattern": str(self.pattern),
            "scope": self.scope,
            "include": self.include,
            "exclude": self.exclude,
            "rewind_step": self.rewind_step,
        }
        return arguments.settings_key(self, settings)

    # ------------------------------------------------------------------------------------------------ policy

    def scheduled_sparsity(self, step: int) -> float:
        """The sparsity the schedule asks for after ``step`` optimizer steps. Override for a custom schedule."""
        return self.ramp.value_at(step, self.target_sparsity)

    # ------------------------------------------------------------------------------------------------ hooks

    composition_rank = 1  # after low-rank, before QAT: lightning_compress.composition

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            composition.prepare_all(trainer, pl_module, self)  # every technique, in one order

    def is_prepared(self, pl_module: pl.LightningModule) -> bool:
        return self._prepared_for is pl_module

    def prepare_fit(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Choose the weights to prune (and check each fits the pattern); nothing is changed before a step."""
        teardown.destroy_process_groups_at_exit()  # a finished run's gloo threads are joined before finalization
        self._prepared_for = pl_module
        modules = self.targeting.select(pl_module, type(self).__name__)
        self._targets, self._transposed = {}, set()
        for name, module in modules.items():
            shape = distributed.full_shape(module.weight)
            if weight_is_transposed(module):
                self._transposed.add(f"{name}.weight")
                shape = torch.Size(shape[::-1])
            self.pattern.check_layer(name, type(module).__name__, shape)
            self._targets[f"{name}.weight"] = name

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._params = {name: pl_module.get_parameter(name) for name in self._targets}
        if self.pattern.prunes_bias:  # a pruned channel's bias goes too, so the channel is really dead
            for module_name in self._targets.values():
                if getattr(pl_module.get_submodule(module_name), "bias", None) is not None:
                    self._params[f"{module_name}.bias"] = pl_module.get_parameter(f"{module_name}.bias")
        self._sharded = any(distributed.is_zero3_partitioned(p) for p in self._params.values())
        if self._saved_masks:
            self._set_masks({name: self._restored(name, saved) for name, saved in self._saved_masks.items()})
            self._saved_masks = {}
        step = trainer.global_step
        if self.rewind_step == step and not self.rewind_values:
            self._snapshot_for_rewind()
        if self.masks:  # resumed: re-apply what was saved
            self._apply_masks()
        self._update(pl_module, step, log=False)  # Lightning allows no logging in on_train_start
        self._remove_grad_hooks()
        self._grad_hooks = [
            param.register_hook(functools.partial(self._mask_grad, name))
            for name, param in self._params.items()
            if param.requires_grad and not self._sharded  # ZeRO-3: on_after_backward masks the partitions
        ]

    @override
    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """ZeRO-3: zero the pruned entries of this rank's gradient partitions, before clipping and the step read
        them (the same gradients the full-gradient hook gives elsewhere: a mask commutes with the reduction)."""
        if self._sharded and self.masks:
            names = [name for name in self._params if name in self.masks and self._params[name].requires_grad]
            pieces = [self.masks[n].view(torch.uint8) for n in names]  # as bytes: 4x faster than a bool multiply
            distributed.mask_local_grads_([self._params[n] for n in names], pieces)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step == self.last_step:  # no optimizer step in this batch (gradient accumulation)
            return
        if self.masks:
            self._apply_masks()
        if step == self.rewind_step and not self.rewind_values:
            self._snapshot_for_rewind()
        masks_before = self.masks
        self._update(pl_module, step, log=self.log_per_layer)
        if self.masks is not masks_before or logs_this_step(trainer):  # logging costs ~1 % of a small step
            pl_module.log("compress/sparsity", self.sparsity(), prog_bar=True, on_step=True, on_epoch=False)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove_grad_hooks()
        if self.masks:
            self._apply_masks()  # fold: the weights themselves hold the zeros; nothing else remains

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._remove_grad_hooks()

    @override
    def state_dict(self) -> dict[str, Any]:
        """The masks full-shaped (whatever the strategy and the number of ranks), packed 8 to a byte. Under ZeRO-3
        a collective that puts them together one layer at a time: Lightning calls it on every rank."""
        masks = self._saved_masks or {
            name: {"shape": list(full.shape), "bits": packing.pack_mask(full.flatten())}
            for name, full in self._full_masks_one_by_one()
        }
        return {
            "masks": masks,
            "mask_sparsity": self.mask_sparsity,
            "last_step": self.last_step,
            "rewind_values": {name: value.cpu() for name, value in self.rewind_values.items()},
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._saved_masks = dict(state_dict["masks"])  # unpacked, or sharded, once the parameters are known
        self.masks, self._zeros = {}, {}
        self.mask_sparsity = float(state_dict["mask_sparsity"])
        self.last_step = int(state_dict["last_step"])
        self.rewind_values = dict(state_dict["rewind_values"])

    # ------------------------------------------------------------------------------------------------ work

    def sparsity(self) -> float:
        """Fraction of the targeted weights that the masks zero (biases not counted); counted when masks change."""
        weights = [name for name in self._targets if name in self._zeros]
        total = sum(self._numel(name) for name in weights)
        return sum(self._zeros[name] for name in weights) / total if total else 0.0

    def layer_sparsity(self) -> dict[str, float]:
        return {
            module: self._zeros[weight] / self._numel(weight)
            for weight, module in self._targets.items()
            if weight in self._zeros
        }

    def full_masks(self) -> dict[str, torch.Tensor]:
        """The full-shaped masks on the CPU, under any strategy; a collective under ZeRO-3 (every rank calls it)."""
        return dict(self._full_masks_one_by_one())

    def _full_masks_one_by_one(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name, mask in self.masks.items():
            yield name, (distributed.unshard(self._params[name], mask) if self._sharded else mask).cpu()

    def _numel(self, name: str) -> int:
        return distributed.full_shape(self._params[name]).numel()

    def _set_masks(self, masks: dict[str, torch.Tensor]) -> None:
        """Take ``masks`` (full-shaped, or this rank's shards under ZeRO-3) and count what they prune."""
        self.masks = masks
        if not self._sharded or not masks:
            self._zeros = {name: int(mask.numel() - mask.count_nonzero()) for name, mask in masks.items()}
            return
        names = list(masks)
        local = [int((~masks[n][: distributed.shard_range(self._params[n])[1]]).sum()) for n in names]
        self._zeros = dict(zip(names, distributed.sum_across_ranks(local, self._params[names[0]]), strict=True))

    def _restored(self, name: str, saved: Any) -> torch.Tensor:
        """A mask from a checkpoint (packed, or a bool tensor as older versions wrote it), as this rank keeps it."""
        param = self._params[name]
        if isinstance(saved, dict):
            shape = torch.Size(saved["shape"])
            saved = packing.unpack_mask(saved["bits"], shape.numel()).view(shape)
        return distributed.shard_of(param, saved, pad=True) if self._sharded else saved.to(param.device)

    def _update(self, pl_module: pl.LightningModule, step: int, log: bool) -> None:
        """Recompute the masks if ``step`` is on the update grid and the schedule asks for more sparsity."""
        self.last_step = step
        if not self.should_update(step):
            return
        sparsity = self.scheduled_sparsity(step)
        if sparsity > self.mask_sparsity or not self.masks:
            self._set_masks(self._sharded_masks(sparsity) if self._sharded else self._gathered_masks(sparsity))
            self.mask_sparsity = sparsity
            detail = {"sparsity": self.sparsity(), "pattern": str(self.pattern)}
            events.publish(pl_module.trainer, events.CompressionEvent(step, self.state_key, events.MASKS, detail))
        if step >= self.end_step and self.rewind_values:
            self._rewind()
        self._apply_masks()
        if log:
            pl_module.log_dict(
                {f"compress/sparsity/{layer}": value for layer, value in self.layer_sparsity().items()},
                on_step=True,
                on_epoch=False,
            )

    def _gathered_masks(self, sparsity: float) -> dict[str, torch.Tensor]:
        names = list(self._targets)
        weights = dict(zip(names, distributed.full_values([self._params[n] for n in names]), strict=True))
        masks = self._out_in(compute_masks(self.pattern, self.scope, sparsity, self._out_in(weights),
                                           self._out_in(self.masks)))  # fmt: skip
        if self.pattern.prunes_bias:
            masks.update(self._bias_masks(masks))
        return masks

    def _sharded_masks(self, sparsity: float) -> dict[str, torch.Tensor]:
        """ZeRO-3: this rank's shards of the masks, computed without gathering the model."""
        weights = {name: self._params[name] for name in self._targets}
        masks = sharded.shard_masks(self.pattern, self.scope, sparsity, weights, self.masks, self._transposed)
        if self.pattern.prunes_bias:  # one layer's weight mask at a time gives its bias mask
            for weight, module in self._targets.items():
                bias = self._params.get(f"{module}.bias")
                if bias is not None:
                    rows = self._out_in({weight: distributed.unshard(weights[weight], masks[weight])})[weight]
                    masks[f"{module}.bias"] = distributed.shard_of(bias, rows.flatten(1).any(dim=1), pad=True)
        return masks

    def _out_in(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Weights (or masks) with the transposed ones turned to ``(out, in)``, the layout patterns work in; and back
        (a transpose is its own inverse)."""
        return {name: t.t().contiguous() if name in self._transposed else t for name, t in tensors.items()}

    def _bias_masks(self, weight_masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        rows = self._out_in(weight_masks)
        return {
            f"{module}.bias": rows[weight].flatten(1).any(dim=1)
            for weight, module in self._targets.items()
            if f"{module}.bias" in self._params
        }

    def _apply_masks(self) -> None:
        if self._multipliers is None or self._multipliers[0] is not self.masks:
            names = [name for name in self._params if name in self.masks]
            self._multipliers = (self.masks, names, [self._multiplier(n) for n in names])
        _, names, multipliers = self._multipliers
        if not self._sharded:
            distributed.mask_([self._params[n] for n in names], multipliers)
            return
        shards = [i for i, n in enumerate(names) if not distributed.is_zero3_persistent(self._params[n])]
        whole = [i for i in range(len(names)) if i not in shards]
        distributed.mask_shards_([self._params[names[i]] for i in shards], [multipliers[i] for i in shards])
        distributed.mask_([self._params[names[i]] for i in whole], [multipliers[i] for i in whole])

    def _multiplier(self, name: str) -> torch.Tensor:
        """The mask in the parameter's dtype: a multiply by it is ~8x faster than by a bool mask. Not for ZeRO-3
        shard masks: a float copy would cost as much memory as the rank's share of the weights; their bytes read as
        uint8 (no copy) multiply 4x faster than as bool. A parameter ZeRO-3 keeps whole (below its persistence
        threshold) needs its whole mask (a collective)."""
        param, mask = self._params[name], self.masks[name]
        if not self._sharded:
            return mask.to(param.device, param.dtype)
        return distributed.unshard(param, mask) if distributed.is_zero3_persistent(param) else mask.view(torch.uint8)

    def _mask_grad(self, name: str, grad: torch.Tensor) -> torch.Tensor | None:
        """The tensor hook: ``grad`` with the pruned entries zeroed (the full-shape gradient, also under ZeRO-3);
        ``None`` (unchanged) before the first masks."""
        mask = self.masks.get(name)
        if mask is None:
            return None
        key = (name, grad.device, grad.dtype)
        cached = self._grad_multipliers.get(key)
        if cached is None or cached[0] is not mask:
            cached = (mask, mask.to(grad.device, grad.dtype))
            self._grad_multipliers[key] = cached
        return grad * cached[1]

    def _remove_grad_hooks(self) -> None:
        for handle in self._grad_hooks:
            handle.remove()
        self._grad_hooks = []
        self._grad_multipliers = {}

    def _snapshot_for_rewind(self) -> None:
        names = list(self._params)
        values = distributed.full_values([self._params[n] for n in names])
        self.rewind_values = {n: v.cpu() for n, v in zip(names, values, strict=True)}

    def _rewind(self) -> None:
        names = [n for n in self._params if n in self.rewind_values]
        distributed.write_full_([self._params[n] for n in names], [self.rewind_values[n] for n in names])
        self.rewind_values = {}


def _check_target(target_sparsity: float | None, pattern: Pattern) -> float:
    fixed = pattern.fixed_sparsity
    if fixed is not None:
        if target_sparsity is not None and abs(target_sparsity - fixed) > 1e-9:
            raise ValueError(
                f"`target_sparsity`={target_sparsity!r} contradicts `pattern`={str(pattern)!r}, whose sparsity is"
                f" fixed at {fixed:g}. HINT: omit target_sparsity."
            )
        return fixed
    if target_sparsity is None:
        raise ValueError(f"`target_sparsity` is required for `pattern`={str(pattern)!r}: a fraction in [0, 1).")
    return arguments.fraction(
        "target_sparsity",
        target_sparsity,
        high_open=True,
        what="(the fraction of targeted weights set to zero)",
        hint="0.9 means 90 % zeros.",
    )
