"""LowRankRefactoring: factorise Linear/Conv2d layers by SVD at setup, lower their rank on a schedule, truncate at
fit end so that shapes, FLOPs and latency shrink for real."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from typing_extensions import override

from lightning_compress import distributed, events, schedules
from lightning_compress._lightning import Callback, pl, rank_zero_info
from lightning_compress.lowrank.layers import LowRankConv2d, LowRankLinear, _Factorised
from lightning_compress.lowrank.ranks import LayerSpectrum, rank_for_energy, rank_for_ratio, ranks_for_budget
from lightning_compress.schedules import ScheduleName
from lightning_compress.targeting import Targeting

FACTORISABLE: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv2d)


class LowRankRefactoring(Callback):
    """Refactor the targeted layers into two thin factors and shrink their rank toward a target while training.

    At ``setup`` (before the strategy wraps the model) every targeted Linear/Conv2d becomes a full-rank
    :class:`LowRankLinear` / :class:`LowRankConv2d` from its SVD: the model computes what it computed before. From
    ``start_step`` to ``end_step`` the effective rank of each layer falls along ``schedule`` (on the ``update_every``
    grid) to its target, dropping the components that contribute least (``||first_i|| * ||second_i||``); shapes do
    not change, so DDP and DeepSpeed keep their parameters. At the end of ``fit`` each layer is truncated to its
    active components (not under DeepSpeed: see ``truncate_at_fit_end``).

    Exactly one target: ``rank_ratio`` (each layer keeps that fraction of its full rank), ``energy`` (each layer
    keeps the fewest singular directions holding that share of its squared singular values), or ``param_budget``
    (the targeted layers together keep that fraction of their dense weights; ranks are allocated across layers by
    singular-value energy per weight). Layers whose target rank would not hold fewer weights than the dense layer
    are left dense, with a log line saying why.

    Args:
        rank_ratio: fraction of each layer's full rank to keep, in (0, 1].
        energy: share of each layer's squared singular values to keep, in (0, 1].
        param_budget: fraction of the targeted layers' dense weights the factors may hold, in (0, 1].
        start_step: optimizer step at which the rank starts to fall.
        end_step: step at which every layer reaches its target rank (> ``start_step``).
        update_every: steps between rank updates.
        schedule: ``cubic`` (fast first, gentle near the target), ``linear``, ``exponential`` or ``constant``.
        include: regular expressions (whole qualified names) of layers to factorise; default every Linear/Conv2d.
        exclude: regular expressions of layers to keep dense.
        truncate_at_fit_end: replace each factorised layer by its truncated copy when fit ends (not under DeepSpeed,
            whose engine keeps the full-size factors: consolidate the checkpoint, ``prepare``, ``truncate``).
        min_saving: a layer is factorised only if its factors hold at least this share fewer weights than the dense
            layer (two thin matmuls that save almost nothing are slower than one); in [0, 1).
    """

    def __init__(
        self,
        rank_ratio: float | None = None,
        energy: float | None = None,
        param_budget: float | None = None,
        start_step: int = 0,
        end_step: int | None = None,
        update_every: int = 10,
        schedule: ScheduleName = "cubic",
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        truncate_at_fit_end: bool = True,
        min_saving: float = 0.1,
    ) -> None:
        given = {"rank_ratio": rank_ratio, "energy": energy, "param_budget": param_budget}
        chosen = {k: v for k, v in given.items() if v is not None}
        if len(chosen) != 1:
            raise ValueError(
                "Give exactly one of `rank_ratio`, `energy` and `param_budget`; got"
                f" {', '.join(f'{k}={v!r}' for k, v in given.items())}. HINT: rank_ratio=0.25 keeps a quarter of"
                " each layer's rank; energy=0.9 keeps 90 % of each layer's spectrum; param_budget=0.5 keeps half the"
                " weights."
            )
        [(self.criterion, value)] = chosen.items()
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
            raise ValueError(f"`{self.criterion}` must be a number in (0, 1]; got {value!r}.")
        self.value = float(value)
        self.rank_ratio, self.energy, self.param_budget = rank_ratio, energy, param_budget
        for name, step in (("start_step", start_step), ("update_every", update_every)):
            if isinstance(step, bool) or not isinstance(step, int) or step < (1 if name == "update_every" else 0):
                raise ValueError(f"`{name}` must be an integer >= {1 if name == 'update_every' else 0}; got {step!r}.")
        if end_step is None or isinstance(end_step, bool) or not isinstance(end_step, int) or end_step <= start_step:
            raise ValueError(
                f"`end_step` must be an integer step after `start_step`={start_step}; got {end_step!r}."
                " HINT: for a one-shot truncation use schedule='constant' with end_step=start_step + 1."
            )
        if schedule not in schedules.SCHEDULES:
            raise ValueError(f"`schedule` must be one of {', '.join(schedules.SCHEDULES)}; got {schedule!r}.")
        if not isinstance(truncate_at_fit_end, bool):
            raise ValueError(f"`truncate_at_fit_end` must be True or False; got {truncate_at_fit_end!r}.")
        self.start_step, self.end_step, self.update_every = start_step, end_step, update_every
        self.schedule: ScheduleName = schedule
        self.include, self.exclude = include, exclude
        self.targeting = Targeting.from_arguments(include, exclude, layer_types=FACTORISABLE)
        self.truncate_at_fit_end = truncate_at_fit_end
        if isinstance(min_saving, bool) or not isinstance(min_saving, (int, float)) or not 0.0 <= min_saving < 1.0:
            raise ValueError(f"`min_saving` must be a number in [0, 1); got {min_saving!r}. HINT: 0.1 = 10 % fewer.")
        self.min_saving = float(min_saving)
        # State: the target rank of each factorised layer (also in checkpoints) and the layers themselves.
        self.target_ranks: dict[str, int] = {}
        self.full_ranks: dict[str, int] = {}
        self.skipped: dict[str, str] = {}
        self.layers: dict[str, _Factorised] = {}

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(criterion=self.criterion, value=self.value, include=self.include)

    # ------------------------------------------------------------------------------------------------ policy

    def scheduled_rank(self, name: str, step: int) -> int:
        """The effective rank the schedule gives layer ``name`` after ``step`` optimizer steps. Override to change."""
        full, target = self.full_ranks[name], self.target_ranks[name]
        removed = schedules.value_at(  # the share of components switched off, like a sparsity
            step, schedule=self.schedule, target=1.0 - target / full, start_step=self.start_step,
            end_step=self.end_step, update_every=self.update_every,
        )  # fmt: skip
        return max(target, full - math.floor(removed * full + 1e-9))

    def should_update(self, step: int) -> bool:
        if step < self.start_step or step > self.end_step:
            return False
        return step == self.end_step or (step - self.start_step) % self.update_every == 0

    # ------------------------------------------------------------------------------------------------ hooks

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or self.layers:
            return
        self.layers, self.target_ranks, self.skipped = self.prepare(pl_module)
        self.full_ranks = {name: layer.rank for name, layer in self.layers.items()}
        for name, reason in self.skipped.items():
            rank_zero_info(f"LowRankRefactoring: {name} stays dense: {reason}.")

    def prepare(self, model: nn.Module) -> tuple[dict[str, _Factorised], dict[str, int], dict[str, str]]:
        """Factorise the targeted layers of ``model`` in place (what ``setup`` does). Returns the factorised layers,
        their target ranks and the layers left dense with the reason. Raises when no layer would be smaller."""
        modules = self.targeting.select(model)
        spectra = {}
        for name, module in modules.items():
            if isinstance(module, nn.Conv2d) and (module.groups != 1 or module.padding_mode != "zeros"):
                continue
            with distributed.gathered([module.weight]):
                weight = module.weight.detach().reshape(distributed.full_shape(module.weight)[0], -1)
                singular = torch.linalg.svdvals(weight.double()).float()
            spectra[name] = LayerSpectrum(name, weight.shape[0], weight.shape[1], singular)
        targets = self._target_ranks(list(spectra.values()))
        skipped = {name: "grouped or non-zero-padded convolution" for name in modules if name not in spectra}
        skipped.update(
            {
                name: f"no rank makes it `min_saving`={self.min_saving:g} smaller"
                for name in spectra
                if name not in targets
            }
        )
        for name, rank in list(targets.items()):
            spectrum = spectra[name]
            if rank > spectrum.max_useful_rank(self.min_saving):
                skipped[name] = (
                    f"its target rank {rank} would hold {spectrum.params_at(rank):,} weights in two factors, against"
                    f" {spectrum.dense_params:,} dense: not `min_saving`={self.min_saving:g} fewer"
                )
                del targets[name]
        if not targets:
            raise ValueError(
                f"LowRankRefactoring would make no layer of {type(model).__name__} smaller with"
                f" `{self.criterion}`={self.value}: {'; '.join(f'{n}: {r}' for n, r in skipped.items())}."
                " HINT: ask for a lower rank_ratio / energy / param_budget, or target larger layers."
            )
        layers = {}
        for name in targets:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            module = getattr(parent, child)
            layer, _ = (LowRankConv2d.from_conv2d if isinstance(module, nn.Conv2d) else LowRankLinear.from_linear)(
                module
            )
            setattr(parent, child, layer)
            layers[name] = layer
        return layers, targets, skipped

    def _target_ranks(self, spectra: list[LayerSpectrum]) -> dict[str, int]:
        if self.criterion == "param_budget":
            return ranks_for_budget(spectra, self.value, self.min_saving)
        pick = rank_for_ratio if self.criterion == "rank_ratio" else rank_for_energy
        return {s.name: pick(s, self.value) for s in spectra}

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._update(trainer, trainer.global_step)  # a no-op on a resumed run: the masks came with the model

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._update(trainer, trainer.global_step)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.truncate_at_fit_end or not self.layers:
            return
        if _uses_deepspeed(trainer):
            rank_zero_info(
                "LowRankRefactoring: under DeepSpeed the layers are not truncated at fit end (the engine and its fp32"
                " master copy keep the full-size factors, so a checkpoint saved afterwards would disagree with itself)."
                " Consolidate the checkpoint (zero_to_fp32), load it into a model prepared with `prepare(model)`, and"
                " call `truncate(model)`."
            )
            return
        self.truncate(pl_module)

    def truncate(self, model: nn.Module) -> None:
        """Replace every factorised layer of ``model`` by its physically smaller copy (active components only)."""
        for name, module in list(model.named_modules()):
            if isinstance(module, _Factorised):
                parent_name, _, child = name.rpartition(".")
                parent = model.get_submodule(parent_name) if parent_name else model
                setattr(parent, child, module.truncated())
                if name in self.layers:
                    self.layers[name] = getattr(parent, child)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"target_ranks": dict(self.target_ranks)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("target_ranks", {})
        if self.target_ranks and saved.keys() != self.target_ranks.keys():
            raise ValueError(
                f"The checkpoint's LowRankRefactoring factorised {sorted(saved)}, this run {sorted(self.target_ranks)}."
                " HINT: resume with the same model and include/exclude."
            )
        self.target_ranks = dict(saved)  # ranks chosen from the weights at the run's first setup

    # ------------------------------------------------------------------------------------------------ work

    def _update(self, trainer: pl.Trainer, step: int) -> None:
        if not self.should_update(step):
            return
        changed = {}
        for name, layer in self.layers.items():
            rank = self.scheduled_rank(name, step)
            if rank >= layer.active_rank:
                continue
            importance = layer.component_importance()  # collective under ZeRO-3: every rank runs it, in order
            keep = torch.zeros_like(layer.rank_mask)
            keep[torch.topk(importance, rank).indices.to(keep.device)] = True
            layer.set_rank_mask(keep)
            changed[name] = rank
        if changed:
            events.publish(trainer, events.CompressionEvent(step, self.state_key, "lowrank", {"ranks": changed}))


def _uses_deepspeed(trainer: pl.Trainer) -> bool:
    from pytorch_lightning.strategies import DeepSpeedStrategy

    return isinstance(trainer.strategy, DeepSpeedStrategy)
