"""QuantizationAwareTraining under real DDP and DeepSpeed ZeRO-1/2/3 with 2 CPU processes (Adam, lr 1e-3, 24 steps).

Every rank must end with the same weights and scales, a run stopped mid-schedule and resumed must end bitwise equal to
one never stopped, and pruning in the same run must leave its zeros in the int8 model.

An epoch is 19 steps (2 ranks x 32 of 1,168 images), so step 19 is the last step of the first epoch: the one point a
Lightning fit resumes from exactly (a mid-epoch checkpoint restarts the epoch's data). The schedule is placed around
it: fake quantization from step 4, observers still observing at step 19, frozen from step 22.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from launch import STRATEGIES, FitResult, FitSpec, fits_by_strategy, run_fit

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

QAT = {"weight_bits": 8, "activation_bits": 8, "start_step": 4, "freeze_observers_step": 22}
QAT_CALLBACK = f"""
    - class_path: lightning_compress.quantization.callback.QuantizationAwareTraining
      init_args: {{{", ".join(f"{key}: {value}" for key, value in QAT.items())}}}
"""
RECIPE = "trainer:\n  callbacks:" + QAT_CALLBACK
PRUNE_TARGET = 0.8
PRUNE_AND_QAT_RECIPE = (
    "trainer:\n  callbacks:"
    + f"""
    - class_path: lightning_compress.GradualPruning
      init_args: {{target_sparsity: {PRUNE_TARGET}, start_step: 0, end_step: 16, update_every: 4}}"""
    + QAT_CALLBACK
)
MAX_STEPS = 24
STOP_STEP = 19  # the first epoch's last step, between start_step and freeze_observers_step


@pytest.fixture(scope="module")
def uninterrupted_fit(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], FitResult]:
    """The 24-step QAT fit of a strategy, run once per module; it checkpoints at STOP_STEP for the resume tests."""
    return fits_by_strategy(tmp_path_factory.mktemp, RECIPE, max_steps=MAX_STEPS, checkpoint_every_n_steps=STOP_STEP)


def quantization_state(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The observers' statistics and flags and the fake-quant flags: what QAT adds to the model's state."""
    return {key: value for key, value in state_dict.items() if "observer" in key or "fake_quant_enabled" in key}


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_ranks_hold_identical_weights_and_observer_ranges(
    name: str, uninterrupted_fit: Callable[[str], FitResult]
) -> None:
    """Each rank sees other batches; the activation ranges are reduced across ranks so the quantizers agree."""
    rank0, rank1 = uninterrupted_fit(name).ranks
    observers = [key for key in rank0["state_dict"] if "input_observer" in key]
    assert observers, "no activation observer in the state dict"
    assert rank0["state_dict"].keys() == rank1["state_dict"].keys()
    for key, tensor in rank0["state_dict"].items():
        assert torch.equal(tensor, rank1["state_dict"][key]), f"{key} differs between the ranks"
    assert all(torch.isfinite(rank0["state_dict"][key]).all() for key in observers)


@pytest.mark.parametrize("name", ["ddp", "zero2", "zero3"])
def test_a_run_resumed_mid_schedule_ends_identical_to_one_never_stopped(
    name: str, uninterrupted_fit: Callable[[str], FitResult], tmp_path: Path
) -> None:
    """Stopped at step 19 (fake quantization on since step 4, observers still moving) and resumed by a fresh process
    group: every weight, observer statistic and flag ends bitwise equal on both ranks to the run never stopped, and
    the observers froze at step 22 in the resumed run too.

    The observers move between steps 19 and 22, so a resume that lost them (or re-froze them early) would differ.
    """
    whole = uninterrupted_fit(name)
    stopped_at = whole.out_dir / "checkpoints" / f"step={STOP_STEP}.ckpt"
    assert stopped_at.exists(), f"no checkpoint at step {STOP_STEP}"
    spec = FitSpec(**STRATEGIES[name], max_steps=MAX_STEPS, recipe=whole.spec.recipe, resume_from=str(stopped_at))
    resumed = run_fit(spec, tmp_path / "resumed")
    at_stop = quantization_state(checkpoint_module_state(stopped_at))
    for rank in range(2):
        expected, got = whole.ranks[rank], resumed.ranks[rank]
        assert got["global_step"] == expected["global_step"] == MAX_STEPS
        assert got["state_dict"].keys() == expected["state_dict"].keys()
        for key, tensor in expected["state_dict"].items():
            assert torch.equal(got["state_dict"][key], tensor), f"rank {rank}: {key} differs after resume"
        final = quantization_state(got["state_dict"])
        assert at_stop.keys() == final.keys() and final
        flags = {key: bool(value) for key, value in final.items() if value.dtype == torch.bool}
        assert all(flags[key] for key in flags if key.endswith("fake_quant_enabled")), flags
        assert not any(flags[key] for key in flags if key.endswith("observer.enabled")), flags
        assert all(at_stop[key] for key in flags if key.endswith("observer.enabled")), "observers frozen at step 19"
        statistics = [key for key in final if key.endswith(("min_val", "max_val"))]
        assert all(torch.isfinite(final[key]).all() for key in statistics)
        moved = [key for key in statistics if "input_observer" in key and not torch.equal(final[key], at_stop[key])]
        assert moved, "no activation range moved after step 19: the resume test would be vacuous"


def test_pruning_with_qat_keeps_pruned_weights_zero_through_int8_conversion(tmp_path: Path) -> None:
    """GradualPruning and QAT in one ZeRO-2 recipe: after every step the pruned weights are exactly zero in the module
    and the fp32 master; both ranks end with the same weights, masks and (finite) observers; and converting the
    trained model to int8 keeps every pruned weight an integer zero while the surviving weights stay non-zero."""
    from lightning_compress import convert_to_int8
    from lightning_compress.data import DigitsDataModule
    from lightning_compress.models import ImageClassifier
    from lightning_compress.quantization.callback import QuantizationAwareTraining

    recipe = tmp_path / "prune_qat.yaml"
    recipe.write_text(PRUNE_AND_QAT_RECIPE)
    spec = FitSpec(**STRATEGIES["zero2"], max_steps=MAX_STEPS, recipe=str(recipe), watch_masks=True)
    rank0, rank1 = run_fit(spec, tmp_path / "fit").ranks

    for rank, result in enumerate((rank0, rank1)):
        checks = result["mask_checks"]
        assert [c["step"] for c in checks] == list(range(1, MAX_STEPS + 1)), f"rank {rank} missed steps"
        assert all(c["master_checked"] for c in checks)
        assert all(c["module_nonzeros_under_mask"] == c["master_nonzeros_under_mask"] == 0 for c in checks), checks
    assert rank0["masks"].keys() == rank1["masks"].keys() and rank0["masks"]
    for key in rank0["masks"]:
        assert torch.equal(rank0["masks"][key], rank1["masks"][key]), key
    state = rank0["state_dict"]
    assert state.keys() == rank1["state_dict"].keys()
    for key, tensor in state.items():
        assert torch.equal(tensor, rank1["state_dict"][key]), f"{key} differs between the ranks"
    observers = [key for key in quantization_state(state) if key.endswith(("min_val", "max_val"))]
    assert any("input_observer" in key for key in observers) and any("weight_observer" in key for key in observers)
    assert all(torch.isfinite(state[key]).all() for key in observers)

    weights = [key for key in rank0["masks"] if key.endswith("weight")]
    pruned = sum(int((~rank0["masks"][key]).sum()) for key in weights)
    total = sum(rank0["masks"][key].numel() for key in weights)
    assert pruned / total == pytest.approx(PRUNE_TARGET, abs=0.005)
    for key in weights:
        assert torch.count_nonzero(state[key][~rank0["masks"][key]]) == 0, f"{key}: non-zeros under the mask"

    data = DigitsDataModule
    model = ImageClassifier(in_channels=data.in_channels, image_size=data.image_size, num_classes=data.num_classes)
    QuantizationAwareTraining(**QAT).prepare(model)
    model.load_state_dict(state)
    int8 = convert_to_int8(model)
    for key in weights:
        layer = key.removesuffix(".weight")
        float_weight, int8_weight = model.get_parameter(key).detach(), int8.get_submodule(layer).qweight
        assert int8_weight.dtype == torch.int8 and int8_weight.shape == float_weight.shape, layer
        zero = float_weight == 0
        assert torch.equal(zero, ~rank0["masks"][key]), f"{layer}: float zeros are not the pruning mask"
        assert int(int8_weight[zero].count_nonzero()) == 0, f"{layer}: a pruned weight is a non-zero integer"
        survivors = int8_weight[~zero]
        assert survivors.numel() > 0 and float(survivors.ne(0).float().mean()) > 0.95, f"{layer}: int8 weights vanish"


def test_a_zero3_checkpoint_converts_to_int8_through_its_consolidated_state(
    uninterrupted_fit: Callable[[str], FitResult],
) -> None:
    """Under ZeRO-3 no int8 model is made at fit end; the route the callback's message gives works: DeepSpeed's
    consolidated state (weights and observer buffers) loads strictly into a prepared model, which converts, and the
    int8 model predicts what that QAT model predicts."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from lightning_compress import convert_to_int8
    from lightning_compress.data import DigitsDataModule
    from lightning_compress.models import ImageClassifier
    from lightning_compress.quantization.callback import QuantizationAwareTraining

    folder = uninterrupted_fit("zero3").out_dir / "checkpoints" / f"step={STOP_STEP}.ckpt"
    state = get_fp32_state_dict_from_zero_checkpoint(str(folder), tag="checkpoint")
    assert quantization_state(state), "the consolidated state lacks the observers"
    data = DigitsDataModule
    model = ImageClassifier(in_channels=data.in_channels, image_size=data.image_size, num_classes=data.num_classes)
    QuantizationAwareTraining(**QAT).prepare(model)
    model.load_state_dict(state, strict=True)
    int8 = convert_to_int8(model)
    digits = DigitsDataModule()
    digits.setup("validate")
    images = torch.cat([batch[0] for batch in digits.val_dataloader()])
    with torch.no_grad():
        agree = (int8(images).argmax(1) == model.eval()(images).argmax(1)).float().mean()
    assert agree > 0.98


def checkpoint_module_state(path: Path) -> dict[str, torch.Tensor]:
    """The module state (weights and buffers) a Lightning checkpoint file holds, or, for a DeepSpeed checkpoint folder,
    the buffers its model-states file holds (the weights there are ZeRO partitions)."""
    if path.is_dir():
        states = sorted(path.rglob("*mp_rank_00_model_states.pt"))[0]  # ZeRO-3 writes one per rank, ZeRO-1/2 one
        return torch.load(states, map_location="cpu", weights_only=False)["module"]
    return torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
