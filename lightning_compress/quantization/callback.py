"""QuantizationAwareTraining: fake-quantize Linear/Conv1d/Conv2d and transformers Conv1D weights (and optionally
their inputs) while training, then convert to a model with int8 layers that run integer kernels."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn
from typing_extensions import override

from lightning_compress import arguments, composition, distributed, events, teardown
from lightning_compress._lightning import Callback, pl, rank_zero_info
from lightning_compress.export import save_compressed
from lightning_compress.lowrank.layers import LowRankConv1D, LowRankConv2d, LowRankLinear
from lightning_compress.quantization.conv1d import QATConv1D
from lightning_compress.quantization.convert import convert_to_int8
from lightning_compress.quantization.fake_quant import QuantSpec
from lightning_compress.quantization.layers import QATConv1d, QATConv2d, QATLinear, _QATBase
from lightning_compress.quantization.lowrank_qat import QATLowRankConv1D, QATLowRankConv2d, QATLowRankLinear
from lightning_compress.targeting import Targeting, weight_is_transposed

QUANTIZABLE: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, LowRankLinear, LowRankConv2d)
"""Also transformers' Conv1D (see targeting); a low-rank layer's factors are quantized (LowRankConv1D included)."""
_QAT_LOW_RANK: dict[type[nn.Module], Any] = {
    LowRankLinear: QATLowRankLinear,
    LowRankConv2d: QATLowRankConv2d,
    LowRankConv1D: QATLowRankConv1D,
}
_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


class QuantizationAwareTraining(composition.Composable, Callback):
    """Swap the targeted Linear/Conv1d/Conv2d layers (and transformers' Conv1D: GPT-2) for QAT layers at ``setup``
    and fake-quantize them on a schedule.

    Before ``start_step`` the layers only observe (calibration warm-up: weight ranges per output channel, input
    ranges by moving average); from ``start_step`` on, forward uses fake-quantized values with a straight-through
    estimator. Observers freeze at ``freeze_observers_step`` and BatchNorm statistics at ``freeze_bn_step``. The
    swap keeps every Parameter object (optimizers, DDP and DeepSpeed see the same parameters) and is reproducible
    from the constructor arguments alone; all quantization state lives in the model's buffers, so it is saved and
    restored with the model.

    Args:
        weight_bits: bits per weight, 2-8 (symmetric, per output channel).
        activation_bits: bits per input activation, 2-8 (asymmetric, per tensor); ``None`` quantizes weights only.
        start_step: optimizer step at which fake quantization starts.
        freeze_observers_step: step from which the ranges stop updating (``None``: never), >= ``start_step``.
        freeze_bn_step: step from which BatchNorm layers use frozen running statistics (``None``: never).
        include: regular expressions (whole qualified names) of the layers to quantize; default every
            Linear/Conv1d/Conv2d and transformers Conv1D (tied weights are left out: GPT-2's ``lm_head``).
        exclude: regular expressions of layers to keep in float.
        convert_at_fit_end: at the end of ``fit``, keep an int8 copy of the model in :attr:`int8_model` (see
            :func:`~lightning_compress.convert_to_int8`); the trained model itself stays a QAT model. Skipped under
            ZeRO-3 (convert the consolidated checkpoint instead).
        weight_group_size: Linear and Conv1D weights get one scale per group of this many consecutive input weights
            instead of one per output channel (finer ranges, for 4-bit weights); it must divide each such layer's
            input features.
            Grouped layers convert to int8 weights that compute in float (no integer kernel takes group scales).
        learnable_scales: LSQ (Esser et al., 2020): the weight and input scales become Parameters that start from the
            observers' values at ``start_step`` and then learn with the model (keep them out of weight decay).
        export_path: where to write the int8 model with ``save_compressed`` at the end of ``fit`` (rank 0). An
            existing file is refused before training starts; nothing is overwritten.
    """

    def __init__(
        self,
        weight_bits: int = 8,
        activation_bits: int | None = None,
        *,
        start_step: int = 0,
        freeze_observers_step: int | None = None,
        freeze_bn_step: int | None = None,
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        convert_at_fit_end: bool = True,
        export_path: str | None = None,
        weight_group_size: int | None = None,
        learnable_scales: bool = False,
    ) -> None:
        bits_hint = "8 is the usual choice; 4 for weights that must be small."
        self.weight_bits = arguments.integer("weight_bits", weight_bits, minimum=2, maximum=8, hint=bits_hint)
        self.activation_bits = arguments.integer(
            "activation_bits",
            activation_bits,
            minimum=2,
            maximum=8,
            allow_none=True,
            what="(None quantizes weights only)",
            hint=bits_hint,
        )
        self.start_step = arguments.step("start_step", start_step)
        frozen_hint = "ranges and statistics are frozen after fake quantization has started, not before."
        self.freeze_observers_step, self.freeze_bn_step = (
            arguments.step(name, value, after=("start_step", start_step), allow_none=True, hint=frozen_hint)
            for name, value in (("freeze_observers_step", freeze_observers_step), ("freeze_bn_step", freeze_bn_step))
        )
        self.include, self.exclude = include, exclude
        self.convert_at_fit_end = arguments.flag("convert_at_fit_end", convert_at_fit_end)
        if export_path is not None and (not isinstance(export_path, (str, os.PathLike)) or not os.fspath(export_path)):
            raise arguments.refusal("export_path", export_path, "None or a file path")
        if export_path is not None and not convert_at_fit_end:
            raise ValueError(
                "`export_path` needs `convert_at_fit_end=True`: the exported model is the one converted at fit end."
            )
        self.weight_group_size = arguments.integer(
            "weight_group_size",
            weight_group_size,
            minimum=1,
            allow_none=True,
            what="(None: one scale per output channel)",
            hint="32, 64 or 128 are usual.",
        )
        self.learnable_scales = arguments.flag("learnable_scales", learnable_scales)
        self.export_path = None if export_path is None else Path(os.fspath(export_path))
        self.int8_model: nn.Module | None = None
        self.targeting = Targeting.from_arguments(include, exclude, layer_types=QUANTIZABLE, transformers_conv1d=True)
        self.weight_spec = QuantSpec(bits=weight_bits, symmetric=True, per_channel=True, channel_axis=0)
        self.activation_spec = (
            None if activation_bits is None else QuantSpec(bits=activation_bits, symmetric=False, per_channel=False)
        )
        self.layers: dict[str, nn.Module] = {}  # QAT layers, and QAT low-rank layers
        self._batch_norms: list[nn.Module] = []  # found once at setup, re-frozen every step once frozen
        self._applied: tuple[bool, bool, bool] | None = None  # (fake quant, observers, BN frozen) last set

    @property
    @override
    def state_key(self) -> str:
        """Every setting that changes what is quantized how and when: two that differ coexist in one Trainer."""
        settings = {
            "weight_bits": self.weight_bits,
            "activation_bits": self.activation_bits,
            "start_step": self.start_step,
            "freeze_observers_step": self.freeze_observers_step,
            "freeze_bn_step": self.freeze_bn_step,
            "include": self.include,
            "exclude": self.exclude,
            "weight_group_size": self.weight_group_size,
            "learnable_scales": self.learnable_scales,
        }
        return arguments.settings_key(self, settings)

    composition_rank = 2  # last: quantizes what low-rank and pruning leave (lightning_compress.composition)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            composition.prepare_all(trainer, pl_module, self)  # every technique, in one order

    def is_prepared(self, pl_module: pl.LightningModule) -> bool:
        return bool(self.layers)

    def check_fit(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.export_path is not None and self.export_path.exists():
            raise FileExistsError(
                f"`export_path` {str(self.export_path)!r} already exists; QuantizationAwareTraining will not overwrite"
                " it. HINT: choose a new path or move the file away (checked before training, so nothing was run)."
            )

    def prepare_fit(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Swap the targeted layers for QAT layers (:meth:`prepare`)."""
        teardown.destroy_process_groups_at_exit()  # a finished run's gloo threads are joined before finalization
        self.check_fit(trainer, pl_module)
        self.layers = self.prepare(pl_module)
        self._batch_norms = [m for m in pl_module.modules() if isinstance(m, _BATCH_NORMS)]

    def prepare(self, model: nn.Module) -> dict[str, _QATBase]:
        """Swap the targeted layers of ``model`` for QAT layers, in place (what ``setup`` does); return them by name.

        Use it outside a Trainer to calibrate or to rebuild a QAT model before loading a QAT state dict.
        """
        layers = {}
        for name, module in self.targeting.select(model, type(self).__name__).items():
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            try:
                swapped = self.swap(module)
            except ValueError as err:
                raise ValueError(f"QuantizationAwareTraining cannot quantize layer {name!r}: {err}") from None
            setattr(parent, child, swapped)
            layers[name] = getattr(parent, child)
        return layers

    def swap(self, module: nn.Module) -> nn.Module:
        """The QAT layer that replaces ``module`` (sharing its Parameters). Override to support more layer types."""
        factorised = _QAT_LOW_RANK.get(type(module))
        if factorised is not None:  # LowRankRefactoring acted first: quantize its factors (and the rank mask holds)
            if self.weight_group_size is not None:
                raise ValueError(
                    "`weight_group_size` does not apply to low-rank factors. HINT: exclude the factorised layers"
                    " from this callback, or set weight_group_size=None."
                )
            return factorised.from_lowrank(
                module, self.weight_spec, self.activation_spec, learnable_scales=self.learnable_scales
            )
        if weight_is_transposed(module):  # transformers' Conv1D, weight (in, out)
            return QATConv1D.from_conv1d(
                module, self.weight_spec, self.activation_spec, self.weight_group_size, self.learnable_scales
            )
        if isinstance(module, nn.Conv2d):
            return QATConv2d.from_conv(module, self.weight_spec, self.activation_spec, self.learnable_scales)
        if isinstance(module, nn.Conv1d):
            return QATConv1d.from_conv(module, self.weight_spec, self.activation_spec, self.learnable_scales)
        return QATLinear.from_linear(
            module, self.weight_spec, self.activation_spec, self.weight_group_size, self.learnable_scales
        )

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._applied = None  # resumed or not, set every flag for the current step
        self._apply_schedule(trainer, pl_module)

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        self._apply_schedule(trainer, pl_module)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Every rank observed its own batch: agree on the activation ranges (the widest over the ranks), so all
        ranks quantize alike. DDP's buffer broadcast would keep rank 0's alone; DeepSpeed broadcasts nothing."""
        if self._applied is None or not self._applied[1]:
            return
        observers = [
            observer
            for layer in self.layers.values()
            for observer in (layer.input_observer, getattr(layer, "hidden_observer", None))  # between two factors
            if observer is not None
        ]
        distributed.all_reduce_extrema_([o.min_val for o in observers], [o.max_val for o in observers])

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.convert_at_fit_end or not self.layers:
            return
        if any(distributed.is_zero3_partitioned(p) for layer in self.layers.values() for p in layer.parameters()):
            rank_zero_info(
                "QuantizationAwareTraining: the weights are ZeRO-3 partitioned, so no int8 model is made at fit end."
                " Load the consolidated checkpoint into the model and call lightning_compress.convert_to_int8."
            )
            return
        self.int8_model = convert_to_int8(pl_module)
        if self.export_path is not None and trainer.is_global_zero:
            save_compressed(self.int8_model, self.export_path)

    def _apply_schedule(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step = trainer.global_step
        fake_quant = step >= self.start_step
        observing = self.freeze_observers_step is None or step < self.freeze_observers_step
        bn_frozen = self.freeze_bn_step is not None and step >= self.freeze_bn_step
        if bn_frozen:  # Lightning puts the model back in train mode every epoch: re-freeze every step
            for module in self._batch_norms:
                module.eval()
        if self._applied == (fake_quant, observing, bn_frozen):
            return
        for layer in self.layers.values():
            layer.enable_fake_quant(fake_quant)
            layer.enable_observers(observing)
        if fake_quant and (self._applied is None or not self._applied[0]):  # also after a resume: a fact of this run
            self._start_learnable_scales()
            detail = {"weight_bits": self.weight_bits, "activation_bits": self.activation_bits}
            resumed = step > self.start_step  # switched on in the run this one resumes: announced, not new
            events.publish(trainer, events.CompressionEvent(step, self.state_key, events.QUANTIZE, detail, resumed))
        self._applied = (fake_quant, observing, bn_frozen)

    def _start_learnable_scales(self) -> None:
        """LSQ: scales not yet started (not after a resume) take the observers' values, in the module and in
        DeepSpeed's fp32 master copy alike; every rank holds the same observer values, so the same scales."""
        pending = [layer for layer in self.layers.values() if layer.learnable_scales and not layer.scales_initialized]
        pairs = [pair for layer in pending for pair in layer.scales_from_observers()]
        if pairs:
            distributed.write_full_([param for param, _ in pairs], [value for _, value in pairs])
