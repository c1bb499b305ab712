"""Issue 12's acceptance: every technique, and all three composed, drop in on the transformers families people
fine-tune (BERT, GPT-2, Llama, T5, ViT, ResNet, MobileNetV2; tiny configs, random init, no network).

Each (family, technique) is fitted once per module (6 steps, each schedule squeezed into them) and every check
reads that fit: a fit that raised fails every check that needs it, with the fit's exception as the reason.
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from families import FAMILIES, FamilyModule, eval_logits, fit, layer_weights, parameter_count
from torch import nn

from lightning_compress import (
    GradualPruning,
    LowRankRefactoring,
    QuantizationAwareTraining,
    convert_to_int8,
    load_compressed,
    save_compressed,
)
from lightning_compress._lightning import Callback

MAX_STEPS = 6
TARGET_SPARSITY = 0.5


def pruning(**targets: list[str]) -> GradualPruning:
    """50 % by step 4 (mask updates at 0, 2, 4), held for the last two steps."""
    return GradualPruning(target_sparsity=TARGET_SPARSITY, start_step=0, end_step=4, update_every=2, **targets)


def quantization(**targets: list[str]) -> QuantizationAwareTraining:
    """Observe for 2 steps, fake-quantize from step 2, ranges and BatchNorm frozen from step 4."""
    return QuantizationAwareTraining(
        weight_bits=8,
        activation_bits=8,
        start_step=2,
        freeze_observers_step=4,
        freeze_bn_step=4,
        convert_at_fit_end=False,  # the tests convert, as a user does
        **targets,
    )


def low_rank(**targets: list[str]) -> LowRankRefactoring:
    """A quarter of each layer's rank by step 4 (updates at 2 and 4), truncated at fit end."""
    return LowRankRefactoring(rank_ratio=0.25, start_step=2, end_step=4, update_every=2, **targets)


TECHNIQUES = ("pruning", "qat", "lowrank", "composed", "composed_disjoint")
COMPOSED = ("composed", "composed_disjoint")
COMPOSITIONS = (*COMPOSED, "overlapping")


def callbacks_for(technique: str, family: str) -> list[Callback]:
    """Fresh callbacks. ``composed``: all three, the feed-forward layers factorised and the others pruned, every layer
    quantized (pruning and QAT share layers, and so do low-rank and QAT: its factors are quantized).
    ``composed_disjoint``: the same with the factorised layers left in float (only pruning and QAT share layers).
    ``overlapping``: all three on every layer."""
    feed_forward = [FAMILIES[family].feed_forward]
    if technique == "composed":
        return [pruning(exclude=feed_forward), quantization(), low_rank(include=feed_forward)]
    if technique == "composed_disjoint":
        return [pruning(exclude=feed_forward), quantization(exclude=feed_forward), low_rank(include=feed_forward)]
    if technique == "overlapping":
        return [pruning(), quantization(), low_rank()]
    return [{"pruning": pruning, "qat": quantization, "lowrank": low_rank}[technique]()]


QUANTIZED = ("qat", *COMPOSED)
FACTORISED = ("lowrank", *COMPOSED)
#: The forms of each fitted model a user saves and copies: what they trained, and its int8 conversion.
FORMS = [
    (technique, form)
    for technique in TECHNIQUES
    for form in ("trained", "int8")
    if form == "trained" or technique in QUANTIZED
]
FAMILY_NAMES = list(FAMILIES)


@dataclass
class Fitted:
    """One fit of a family with a technique, and what was measured on the dense model before it."""

    module: FamilyModule
    callbacks: list[Callback]
    dense_parameters: int
    dense_layers: dict[str, int]  # the Linear/Conv/Conv1D weights outside embeddings: name -> elements
    error: BaseException | None = None
    reached_training: bool = False
    forms: dict[str, nn.Module | BaseException] = field(default_factory=dict)


class ReachedTraining(Callback):
    """Records whether the fit got past setup (a refusal at setup never reaches ``on_train_start``)."""

    def __init__(self) -> None:
        self.reached = False

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self.reached = True


def run(family: str, callbacks: list[Callback]) -> Fitted:
    module = FAMILIES[family].module()
    dense = {name: weight.numel() for name, weight in layer_weights(module).items()}
    fitted = Fitted(module, callbacks, parameter_count(module), dense)
    probe = ReachedTraining()
    try:
        fit(module, FAMILIES[family], [*callbacks, probe], max_steps=MAX_STEPS)
    except Exception as err:  # every check that needs this fit reports it
        fitted.error = err
    fitted.reached_training = probe.reached
    return fitted


class Fits:
    """Each (family, technique) fitted once, on first use; the int8 conversion likewise."""

    def __init__(self) -> None:
        self.cache: dict[tuple[str, str], Fitted] = {}

    def fitted(self, family: str, technique: str) -> Fitted:
        """The fit, whether or not it raised."""
        key = (family, technique)
        if key not in self.cache:
            self.cache[key] = run(family, callbacks_for(technique, family))
        return self.cache[key]

    def get(self, family: str, technique: str) -> Fitted:
        """The fit; a fit that raised fails the calling test with its exception."""
        fitted = self.fitted(family, technique)
        if fitted.error is not None:
            pytest.fail(f"the {technique} fit of {family} raised {describe(fitted.error)}", pytrace=False)
        return fitted

    def form(self, family: str, technique: str, form: str) -> nn.Module:
        """The trained model, or its int8 conversion (``convert_to_int8``, a copy)."""
        fitted = self.get(family, technique)
        if form == "trained":
            return fitted.module
        if form not in fitted.forms:
            try:
                fitted.forms[form] = convert_to_int8(fitted.module)
            except Exception as err:
                fitted.forms[form] = err
        converted = fitted.forms[form]
        if isinstance(converted, BaseException):
            pytest.fail(f"convert_to_int8 of the {technique} {family} raised {describe(converted)}", pytrace=False)
        return converted


@pytest.fixture(scope="module")
def fits() -> Fits:
    return Fits()


def describe(error: BaseException) -> str:
    message = str(error).splitlines()[0] if str(error) else ""
    return f"{type(error).__name__}: {message[:300]}"


def inference_form(fits: Fits, family: str, technique: str) -> nn.Module:
    """What a saved model must load as: the int8 model for a QAT-trained one, else the trained model itself."""
    return fits.form(family, technique, "int8" if technique in QUANTIZED else "trained")


# ---------------------------------------------------------------------------------------------------------- checks


@pytest.mark.parametrize("technique", TECHNIQUES)
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_the_fit_runs_and_the_outputs_are_finite(fits: Fits, family: str, technique: str) -> None:
    logits = eval_logits(fits.get(family, technique).module, FAMILIES[family].eval_batch())
    assert torch.isfinite(logits).all(), f"{int((~torch.isfinite(logits)).sum())} of {logits.numel()} not finite"


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_pruning_zeroes_half_of_the_weights_it_targets(fits: Fits, family: str) -> None:
    fitted = fits.get(family, "pruning")
    targeted = list(the(GradualPruning, fitted).layer_sparsity())
    assert targeted, "pruning targeted no layer"
    weights = [fitted.module.get_submodule(name).weight for name in targeted]
    zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    assert zeros == pytest.approx(TARGET_SPARSITY, abs=0.02), f"{zeros:.4f} of the targeted weights are zero"


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_pruning_targets_at_least_90_percent_of_the_layer_weights_outside_embeddings(fits: Fits, family: str) -> None:
    fitted = fits.get(family, "pruning")
    targeted = set(the(GradualPruning, fitted).layer_sparsity())
    covered = sum(n for name, n in fitted.dense_layers.items() if name in targeted)
    share = covered / sum(fitted.dense_layers.values())
    left_out = sorted(set(fitted.dense_layers) - targeted)
    assert share >= 0.9, f"pruning targets {share:.3f} of the layer weights; left out: {left_out[:4]}"


@pytest.mark.parametrize("technique", COMPOSED)
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_the_composed_pruning_reaches_its_target(fits: Fits, family: str, technique: str) -> None:
    fitted = fits.get(family, technique)
    sparsity = the(GradualPruning, fitted).sparsity()
    assert sparsity == pytest.approx(TARGET_SPARSITY, abs=0.02), f"the composed run reports {sparsity:.4f}"


@pytest.mark.parametrize("technique", QUANTIZED)
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_the_int8_model_matches_the_qat_model(fits: Fits, family: str, technique: str) -> None:
    batch = FAMILIES[family].eval_batch()
    qat = eval_logits(fits.get(family, technique).module, batch)
    int8 = eval_logits(fits.form(family, technique, "int8"), batch)
    relative = float((int8 - qat).abs().max() / qat.abs().max())
    same_argmax = float((int8.argmax(-1) == qat.argmax(-1)).float().mean())
    assert relative <= 1e-2, f"max abs difference / max abs = {relative:.4f} > 0.01"
    assert same_argmax >= 0.99, f"same argmax on {same_argmax:.3f} of the batch < 0.99"


@pytest.mark.parametrize("technique", FACTORISED)
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_low_rank_makes_the_model_smaller(fits: Fits, family: str, technique: str) -> None:
    fitted = fits.get(family, technique)
    after = parameter_count(fitted.module)
    assert after < fitted.dense_parameters, f"{fitted.dense_parameters:,} -> {after:,} parameters"


@pytest.mark.parametrize(("technique", "form"), FORMS)
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_the_export_reloads_without_a_skeleton_to_identical_outputs(
    fits: Fits, family: str, technique: str, form: str, tmp_path: Path
) -> None:
    """A QAT-trained model saves as its int8 form (issue 12), so both forms must load as the int8 model."""
    model = fits.form(family, technique, form)
    expected = eval_logits(inference_form(fits, family, technique), FAMILIES[family].eval_batch())
    path = tmp_path / "model.safetensors"
    save_compressed(model, path)
    loaded = load_compressed(path, trusted_prefixes=[FamilyModule.__module__])
    got = eval_logits(loaded, FAMILIES[family].eval_batch())
    assert torch.equal(got, expected), f"max abs difference {float((got - expected).abs().max()):.3g}"


@pytest.mark.parametrize("technique", [technique for technique in TECHNIQUES if technique != "pruning"])
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_the_export_loads_into_a_fresh_float_instance_of_the_users_class_to_identical_outputs(
    fits: Fits, family: str, technique: str, tmp_path: Path
) -> None:
    """The recorded int8 and low-rank layers are built from the manifest and put in at their names."""
    expected_model = inference_form(fits, family, technique)
    path = tmp_path / "model.safetensors"
    save_compressed(fits.form(family, technique, "trained"), path)
    skeleton = FAMILIES[family].module()
    loaded = load_compressed(path, model=skeleton)
    batch = FAMILIES[family].eval_batch()
    got, expected = eval_logits(loaded, batch), eval_logits(expected_model, batch)
    assert torch.equal(got, expected), f"max abs difference {float((got - expected).abs().max()):.3g}"


@pytest.mark.parametrize(("technique", "form"), FORMS)
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_a_deep_copy_gives_identical_outputs(fits: Fits, family: str, technique: str, form: str) -> None:
    model = fits.form(family, technique, form)
    expected = eval_logits(model, FAMILIES[family].eval_batch())
    got = eval_logits(copy.deepcopy(model), FAMILIES[family].eval_batch())
    assert torch.equal(got, expected), f"max abs difference {float((got - expected).abs().max()):.3g}"


@pytest.mark.parametrize("composition", COMPOSITIONS)
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_every_order_of_the_three_callbacks_gives_the_same_model_or_the_same_refusal_at_setup(
    fits: Fits, family: str, composition: str
) -> None:
    outcomes: dict[str, tuple[str, Any]] = {}
    for order in itertools.permutations(range(3)):
        if order == (0, 1, 2) and composition in TECHNIQUES:
            fitted = fits.fitted(family, composition)  # the listed order is the fit the other checks read
        else:
            listed = callbacks_for(composition, family)
            fitted = run(family, [listed[i] for i in order])
        name = " -> ".join(type(callback).__name__ for callback in fitted.callbacks)
        if fitted.error is None:
            outcomes[name] = ("fitted", {k: v.detach().clone() for k, v in fitted.module.state_dict().items()})
        else:
            error = fitted.error
            outcomes[name] = ("refused", (type(error).__name__, str(error), describe(error), fitted.reached_training))
    (first_name, (first_kind, first)), *others = outcomes.items()
    for name, (kind, outcome) in others:
        assert kind == first_kind, f"{first_name}: {summary(first_kind, first)}; but {name}: {summary(kind, outcome)}"
        if kind == "refused":
            assert outcome[:2] == first[:2], f"{first_name} refused with {first[2]}; {name} with {outcome[2]}"
        else:
            assert outcome.keys() == first.keys(), f"{name}'s state dict has other keys than {first_name}'s"
            differ = [key for key in first if not _bit_equal(outcome[key], first[key])]
            assert not differ, f"{name} differs from {first_name} in {len(differ)} tensors, e.g. {differ[:3]}"
    if first_kind == "refused":
        assert not first[3], f"every order refused, but during training, not at setup: {first[2]}"


def the(kind: type[Callback], fitted: Fitted) -> Any:
    """The fit's one callback of type ``kind``."""
    (callback,) = [callback for callback in fitted.callbacks if isinstance(callback, kind)]
    return callback


def summary(kind: str, outcome: Any) -> str:
    return f"refused with {outcome[2]}" if kind == "refused" else "fitted"


def _bit_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
