"""LowRankRefactoring: factorise Linear/Conv2d/Conv1D layers by SVD at setup, lower their rank on a schedule,
truncate at fit end so that shapes, FLOPs and latency shrink for real."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from typing_extensions import override

from lightning_compress import arguments, composition, distributed, events, teardown
from lightning_compress._lightning import Callback, pl, rank_zero_info, uses_deepspeed
from lightning_compress.lowrank.layers import _Factorised, factorise_layer, weight_matrix
from lightning_compress.lowrank.ranks import LayerSpectrum, rank_for_energy, rank_for_ratio, ranks_for_budget
from lightning_compress.lowrank.rebase import rebase_layer
from lightning_compress.lowrank.statistics import Kind, LayerStatistics, sync
from lightning_compress.lowrank.truncate import truncate_factorised
from lightning_compress.ramp import Ramped, StepRamp
from lightning_compress.schedules import ScheduleName
from lightning_compress.targeting import Targeting

FACTORISABLE: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv2d)  # and transformers' Conv1D (see targeting)


class LowRankRefactoring(composition.Composable, Ramped, Callback):
    """Refactor the targeted layers into two thin factors and shrink their rank toward a target while training.

    At ``setup`` (before the strategy wraps the model) every targeted Linear/Conv2d/transformers Conv1D becomes a
    full-rank :class:`LowRankLinear` / :class:`LowRankConv2d` / :class:`LowRankConv1D` from its SVD: the model
    computes what it computed before. From
    ``start_step`` to ``end_step`` the effective rank of each layer falls along ``schedule`` (on the ``update_every``
    grid) to its target, dropping the components that contribute least (``||first_i|| * ||second_i||``); shapes do
    not change, so DDP and DeepSpeed keep their parameters. At the end of ``fit`` each layer is truncated to its
    active components (not under DeepSpeed: see ``truncate_at_fit_end``).

    With ``calibration_steps=k`` the reduction is activation-aware (as SVD-LLM, but while training): over the ``k``
    steps before ``start_step`` every factorised layer gathers the second moment of its inputs, and at ``start_step``
    its factors are rebased, exactly (the layer computes the same), on the SVD of ``W L`` (``L L^T`` the input second
    moment), whose directions are ordered by how much of the layer's *output* they carry on the data. The
    optimizer's moment estimates are carried into the new basis. While the rank falls, the components switched off
    are those adding least to the outputs on the recent batches (``||second_i|| * RMS(h_i)``). Targets from
    ``energy`` and ``param_budget`` are then chosen from the whitened spectrum at ``start_step``; a layer whose
    target would save nothing keeps its full rank and is made dense again at truncation.

    **Trains smaller when the cut is one-shot.** With ``rank_ratio``, ``start_step=0``, ``schedule="constant"`` and
    no calibration (the configuration that measured best so far), the cut needs nothing from training: ``setup``
    factorises every layer straight at its target rank, and training runs with the smaller factors, their fewer
    parameters, optimizer state and FLOPs, from the first step (under DDP and DeepSpeed alike). Wherever the rank
    must fall while training (a ramp, a calibration window, or an ``energy``/``param_budget`` target, which depends
    on the weights and so is not reproducible at a resume's ``setup``), the layers hold full-rank factors until fit
    end: ``rank * (in + out)`` weights at ``rank = min(in, out)``, twice a square layer's dense weights, with their
    optimizer state, and the FLOPs of both factors at full rank.

    Exactly one target: ``rank_ratio`` (each layer keeps that fraction of its full rank), ``energy`` (each layer
    keeps the fewest singular directions holding that share of its squared singular values), or ``param_budget``
    (the targeted layers together keep that fraction of their dense weights, shared out so that every layer keeps
    the same share of its spectrum's energy). Layers whose target rank would not hold fewer weights than the dense
    layer are left dense, with a log line saying why.

    Args:
        rank_ratio: fraction of each layer's full rank to keep, in (0, 1].
        energy: share of each layer's squared singular values to keep, in (0, 1].
        param_budget: fraction of the targeted layers' dense weights the factors may hold, in (0, 1].
        start_step: optimizer step at which the rank starts to fall.
        end_step: step at which every layer reaches its target rank (> ``start_step``).
        update_every: steps between rank updates.
        schedule: ``cubic`` (fast first, gentle near the target), ``linear``, ``exponential`` or ``constant``.
        include: regular expressions (whole qualified names) of layers to factorise; default every Linear, Conv2d
            and transformers Conv1D.
        exclude: regular expressions of layers to keep dense.
        truncate_at_fit_end: replace each factorised layer by its truncated copy when fit ends (not under DeepSpeed,
            whose engine keeps the full-size factors: consolidate the checkpoint, ``prepare``, ``truncate``).
        min_saving: a layer is factorised only if its factors hold at least this share fewer weights than the dense
            layer (two thin matmuls that save almost nothing are slower than one); in [0, 1).
        calibration_steps: optimizer steps before ``start_step`` over which the layers' input statistics are
            gathered for the activation-aware rebase (0: rank by the weights alone); at most ``start_step``. A
            few dozen batches suffice; while gathering, each layer also computes ``x^T x`` of its inputs and the
            ranks add up their sums once, at the window's end (and at a checkpoint written during it).
    """

    def __init__(
        self,
        rank_ratio: float | None = None,
        *,
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
        calibration_steps: int = 0,
    ) -> None:
        self.criterion, value = arguments.exactly_one(
            {"rank_ratio": rank_ratio, "energy": energy, "param_budget": param_budget},
            hint="rank_ratio=0.25 keeps a quarter of each layer's rank; energy=0.9 keeps 90 % of each layer's"
            " spectrum; param_budget=0.5 keeps half the weights.",
        )
        self.value = arguments.fraction(self.criterion, value, low_open=True)
        self.rank_ratio, self.energy, self.param_budget = rank_ratio, energy, param_budget
        self.ramp = StepRamp(start_step=start_step, end_step=end_step, update_every=update_every, schedule=schedule)
        self.include, self.exclude = include, exclude
        self.targeting = Targeting.from_arguments(include, exclude, layer_types=FACTORISABLE, transformers_conv1d=True)
        self.truncate_at_fit_end = arguments.flag("truncate_at_fit_end", truncate_at_fit_end)
        self.min_saving = arguments.fraction("min_saving", min_saving, high_open=True, hint="0.1 = 10 % fewer.")
        self.calibration_steps = arguments.integer(
            "calibration_steps",
            calibration_steps,
            hint="32 gathers the input statistics over the 32 steps before `start_step`; 0 ranks by the weights alone.",
        )
        if calibration_steps > start_step:
            raise ValueError(
                f"`calibration_steps`={calibration_steps} needs `start_step` >= {calibration_steps} (the statistics are"
                f" gathered over the steps right before the rank starts to fall); got start_step={start_step}."
                f" HINT: start_step={calibration_steps}, end_step > that."
            )
        # State (in checkpoints): the target rank of each factorised layer, whether the activation-aware rebase has
        # happened, and the statistics being gathered. The layers themselves come back from the model.
        self.target_ranks: dict[str, int] = {}
        self.rebased = False
        self.statistics: dict[str, LayerStatistics] = {}
        self.full_ranks: dict[str, int] = {}
        self.skipped: dict[str, str] = {}
        self.layers: dict[str, _Factorised] = {}
        self._updated_at: int | None = None

    @property
    @override
    def state_key(self) -> str:
        """Every setting that changes which layers are factorised and how: two that differ coexist in one Trainer."""
        settings = {
            self.criterion: self.value,
            "ramp": self.ramp,
            "include": self.include,
            "exclude": self.exclude,
            "min_saving": self.min_saving,
            "calibration_steps": self.calibration_steps,
        }
        return arguments.settings_key(self, settings)

    # ------------------------------------------------------------------------------------------------ policy

    def scheduled_rank(self, name: str, step: int) -> int:
        """The effective rank the schedule gives layer ``name`` after ``step`` optimizer steps. Override to change."""
        full, target = self.full_ranks[name], self.target_ranks[name]
        removed = self.ramp.value_at(step, 1.0 - target / full)  # the share of components switched off
        return max(target, full - math.floor(removed * full + 1e-9))

    # ------------------------------------------------------------------------------------------------ hooks

    composition_rank = 0  # first: the others act on the weights it leaves (lightning_compress.composition)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            composition.prepare_all(trainer, pl_module, self)  # every technique, in one order

    def is_prepared(self, pl_module: pl.LightningModule) -> bool:
        return bool(self.layers)

    def after_composition(self, pl_module: pl.LightningModule) -> None:
        """QAT may have wrapped the factorised layers (sharing their factors and rank mask): act on the wrappers."""
        self.layers = {name: pl_module.get_submodule(name) for name in self.layers}

    def prepare_fit(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Factorise the targeted layers at full rank (:meth:`prepare`)."""
        teardown.destroy_process_groups_at_exit()  # a finished run's gloo threads are joined before finalization
        self.layers, self.target_ranks, self.skipped = self.prepare(pl_module)
        self.full_ranks = {name: layer.rank for name, layer in self.layers.items()}
        for name, reason in self.skipped.items():
            rank_zero_info(f"LowRankRefactoring: {name} stays dense: {reason}.")
        if self.cuts_at_setup:
            rank_zero_info(
                f"LowRankRefactoring: {len(self.layers)} layers factorised at their target ranks at setup (one-shot"
                f" cut at step 0): ranks {_ranks_text(self.target_ranks)}; training runs with the smaller factors."
            )

    def prepare(self, model: nn.Module) -> tuple[dict[str, _Factorised], dict[str, int], dict[str, str]]:
        """Factorise the targeted layers of ``model`` in place (what ``setup`` does). Returns the factorised layers,
        their target ranks and the layers left dense with the reason. Raises when no layer would be smaller."""
        modules = self.targeting.select(model, type(self).__name__)
        spectra = {}
        for name, module in modules.items():
            if isinstance(module, nn.Conv2d) and (module.groups != 1 or module.padding_mode != "zeros"):
                continue
            with distributed.gathered([module.weight]):
                weight = weight_matrix(module).detach()  # [out, in * kernel]; a Conv1D's (in, out) weight transposed
                singular = torch.linalg.svdvals(weight.double()).float()
            spectra[name] = LayerSpectrum(name, weight.shape[0], weight.shape[1], singular)
        targets = self._target_ranks(list(spectra.values()))  # calibrated energy/budget: only a check of the floor
        if self._targets_from_data:  # the targets come from the whitened spectra at start_step
            targets = {}
            factorise = [name for name, spectrum in spectra.items() if spectrum.max_useful_rank(self.min_saving) >= 1]
        skipped = {name: "grouped or non-zero-padded convolution" for name in modules if name not in spectra}
        for name, rank in list(targets.items()):
            spectrum = spectra[name]
            if rank > spectrum.max_useful_rank(self.min_saving):
                skipped[name] = (
                    f"its target rank {rank} would hold {spectrum.params_at(rank):,} weights in two factors, against"
                    f" {spectrum.dense_params:,} dense: not `min_saving`={self.min_saving:g} fewer"
                )
                del targets[name]
        if not self._targets_from_data:
            factorise = list(targets)
        skipped.update(
            {
                name: f"no rank makes it `min_saving`={self.min_saving:g} smaller"
                for name in spectra
                if name not in factorise and name not in skipped
            }
        )
        if not factorise:
            raise ValueError(
                f"LowRankRefactoring would make no layer of {type(model).__name__} smaller with"
                f" `{self.criterion}`={self.value}: {'; '.join(f'{n}: {r}' for n, r in skipped.items())}."
                " HINT: ask for a lower rank_ratio / energy / param_budget, or target larger layers."
            )
        layers = {}
        for name in factorise:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            module = getattr(parent, child)
            layer, _ = factorise_layer(module, targets[name] if self.cuts_at_setup else None)
            setattr(parent, child, layer)
            layers[name] = layer
        return layers, targets, skipped

    @property
    def cuts_at_setup(self) -> bool:
        """Whether ``setup`` factorises straight at the target ranks (one-shot ``rank_ratio`` at step 0, no
        calibration): the ranks then depend on the layers' shapes alone, so a resumed run builds the same factors."""
        return self.criterion == "rank_ratio" and not self.calibration_steps and self.ramp.value_at(0, 1.0) >= 1.0

    @property
    def _targets_from_data(self) -> bool:
        """Whether the target ranks wait for the whitened spectra at ``start_step`` (energy or budget, calibrated)."""
        return self.calibration_steps > 0 and self.criterion != "rank_ratio"

    def _target_ranks(self, spectra: list[LayerSpectrum]) -> dict[str, int]:
        if self.criterion == "param_budget":
            return ranks_for_budget(spectra, self.value, self.min_saving)
        pick = rank_for_ratio if self.criterion == "rank_ratio" else rank_for_energy
        return {s.name: pick(s, self.value) for s in spectra}

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._update(trainer, trainer.global_step)  # a no-op on a resumed run: the masks came with the model
        self._observe(trainer.global_step)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if self.statistics and self._reads_totals(step):
            sync(list(self.statistics.values()))  # every rank at once: the totals agree everywhere
        if self.calibration_steps and not self.rebased and step >= self.start_step:
            self._rebase(trainer)
        self._update(trainer, step)
        self._observe(step)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for layer in self.layers.values():  # the sums stay callback state: a checkpoint written now can resume
            layer.statistics = None

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.truncate_at_fit_end or not self.layers:
            return
        if uses_deepspeed(trainer):
            rank_zero_info(
                "LowRankRefactoring: under DeepSpeed the layers are not truncated at fit end (the engine and its fp32"
                " master copy keep the full-size factors, so a checkpoint saved afterwards would disagree with itself)."
                " Consolidate the checkpoint (zero_to_fp32), load it into a model prepared with `prepare(model)`, and"
                " call `truncate(model)`."
            )
            return
        self.truncate(pl_module)

    def truncate(self, model: nn.Module) -> None:
        """Replace every factorised layer of ``model`` by its physically smaller copy (active components only), or by
        the dense layer it computes when its active components would not be `min_saving` smaller than that."""
        self.layers = truncate_factorised(model, self.min_saving, self.layers)

    @override
    def state_dict(self) -> dict[str, Any]:
        """The target ranks, and while statistics are gathered their totals over every rank (a collective: Lightning
        calls it on every rank)."""
        state: dict[str, Any] = {"target_ranks": dict(self.target_ranks)}
        if self.calibration_steps:
            sync(list(self.statistics.values()))  # a checkpoint written mid-window holds what every rank saw
            state["rebased"] = self.rebased
            state["statistics"] = {name: stats.state_dict() for name, stats in self.statistics.items()}
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("target_ranks", {})
        if self.target_ranks and saved.keys() != self.target_ranks.keys():
            raise ValueError(
                f"The checkpoint's LowRankRefactoring factorised {sorted(saved)}, this run {sorted(self.target_ranks)}."
                " HINT: resume with the same model and include/exclude."
            )
        self.target_ranks = dict(saved)  # ranks chosen from the weights at the run's first setup (or its rebase)
        self.rebased = bool(state_dict.get("rebased", False))
        self.statistics = {
            name: LayerStatistics.from_state_dict(stats) for name, stats in state_dict.get("statistics", {}).items()
        }

    # ------------------------------------------------------------------------------------------------ work

    def _observing(self, step: int) -> Kind | None:
        """What the layers gather during the batch after ``step``: their inputs in the calibration window, their
        hidden components' energy while the rank falls (calibrated runs only), nothing otherwise."""
        if not self.calibration_steps:
            return None
        if not self.rebased:
            return "inputs" if self.start_step - self.calibration_steps <= step < self.start_step else None
        return "hidden" if self.start_step <= step < self.end_step else None

    def _observe(self, step: int) -> None:
        """Hand each layer the statistics to feed during the next batch (kept across a resume, new after a change)."""
        kind = self._observing(step)
        if kind is None:
            self.statistics = {}
        elif not self.statistics or next(iter(self.statistics.values())).kind != kind:
            self.statistics = {
                name: LayerStatistics(kind, _input_features(layer) if kind == "inputs" else layer.rank)
                for name, layer in self.layers.items()
            }
        for name, layer in self.layers.items():
            layer.statistics = self.statistics.get(name)

    def _reads_totals(self, step: int) -> bool:
        """Whether this batch end reads the statistics' totals: the rebase, or a rank update (its first batch)."""
        rebases = bool(self.calibration_steps) and not self.rebased and step >= self.start_step
        return rebases or (self.should_update(step) and step != self._updated_at)

    def _rebase(self, trainer: pl.Trainer) -> None:
        """Rebase every layer's factors on its activation-whitened SVD, carry the optimizer's moments into the new
        basis, and (energy / budget) choose the target ranks from the whitened spectra. Collective."""
        spectra, energies, unknown, unseen = [], {}, set(), []
        for name, layer in self.layers.items():
            found = rebase_layer(name, layer, self.statistics.get(name), trainer.optimizers)
            spectra.append(found.spectrum)
            unknown |= found.unknown_state
            if found.energy is None:
                unseen.append(name)
            else:
                energies[name] = found.energy
        self.rebased = True
        self.statistics = {}
        for name, energy in energies.items():  # the first rank update judges components by the calibration data
            stats = LayerStatistics("hidden", self.layers[name].rank)
            stats.total, stats.rows = energy.double(), 1
            self.statistics[name] = stats
        if unseen:
            rank_zero_info(
                f"LowRankRefactoring: {', '.join(unseen)} saw no training batch in the {self.calibration_steps} steps"
                f" before start_step={self.start_step} (not in the forward pass?): kept in the weights' SVD basis."
            )
        if self._targets_from_data:
            self.target_ranks = self._target_ranks(spectra)
            for spectrum in spectra:
                useful = spectrum.max_useful_rank(self.min_saving)
                if self.target_ranks.get(spectrum.name, spectrum.full_rank) > useful:
                    rank_zero_info(
                        f"LowRankRefactoring: {spectrum.name} keeps its full rank and is made dense again at"
                        f" truncation: its target rank {self.target_ranks.get(spectrum.name)} is above {useful}, the"
                        f" largest that saves `min_saving`={self.min_saving:g}."
                    )
                    self.target_ranks[spectrum.name] = spectrum.full_rank
        if unknown:
            rank_zero_info(
                f"LowRankRefactoring: optimizer state {sorted(unknown)} is neither a running average of gradients nor"
                " of squared gradients; it was reset to zero for the rebased factors."
            )
        rank_zero_info(
            f"LowRankRefactoring: rebased {len(energies)} layers on their input statistics (the batches of steps"
            f" {self.start_step - self.calibration_steps + 1}-{self.start_step}); target ranks"
            f" {_ranks_text(self.target_ranks)}."
        )

    def _update(self, trainer: pl.Trainer, step: int) -> None:
        if not self.should_update(step) or step == self._updated_at:
            return  # with gradient accumulation every micro-batch of an update step ends here: act on the first
        self._updated_at = step
        energy = {
            name: stats.mean()
            for name, stats in self.statistics.items()
            if self.rebased and stats.kind == "hidden" and stats.rows > 0
        }
        self.statistics = {}  # the next interval gathers afresh (installed by _observe)
        changed = {}
        for name, layer in self.layers.items():
            rank = self.scheduled_rank(name, step)
            if rank >= layer.active_rank:
                continue
            importance = layer.component_importance(energy.get(name))  # collective under ZeRO-3: every rank, in order
            keep = torch.zeros_like(layer.rank_mask)
            keep[torch.topk(importance, rank).indices.to(keep.device)] = True
            layer.set_rank_mask(keep)
            changed[name] = rank
        if changed:
            events.publish(trainer, events.CompressionEvent(step, self.state_key, events.LOWRANK, {"ranks": changed}))


def _ranks_text(ranks: dict[str, int]) -> str:
    """Every layer's rank when few, else their range and median."""
    if len(ranks) <= 8:
        return str(dict(ranks))
    values = sorted(ranks.values())
    return f"{values[0]}-{values[-1]} (median {values[len(values) // 2]}) over {len(values)} layers"


def _input_features(layer: _Factorised) -> int:
    """The width of the rows the flattened weight multiplies (``in`` or ``in * kh * kw``)."""
    shape = layer.dense_weight_shape()
    return math.prod(shape[1:])
