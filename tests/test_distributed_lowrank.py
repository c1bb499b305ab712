"""LowRankRefactoring under real DDP and DeepSpeed ZeRO-1/2/3 with 2 CPU processes (Adam, lr 1e-3, 24 steps).

Every targeted layer of the reference CNN is factorised at setup (conv1 9, conv2 64, fc1 128, fc2 10 components) and
its rank falls linearly to a quarter of that (3, 16, 32, 3) on the grid 4, 7, ..., 19, 22. Every rank must end with
the same factors and rank masks, ZeRO must reach what DDP reaches, and a run stopped mid-schedule and resumed must end
bitwise equal to one never stopped.

An epoch is 19 steps (2 ranks x 32 of 1,168 images), so step 19 is the last step of the first epoch: the one point a
Lightning fit resumes from exactly. Rank updates fall before it (4 ... 19) and after it (22).

What the harness records: each rank's ``rank{N}.pt`` is written in ``on_train_end``, which Lightning calls before
``on_fit_end``, so it holds the full-size factors with their masks (fit-end truncation has not run yet). The model
after truncation is read from ``final.ckpt`` (``save_checkpoint``), written once ``trainer.fit`` has returned.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from launch import STRATEGIES, FitResult, FitSpec, fits_by_strategy, run_fit

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

RATIO = 0.25
LAYERS = {"net.conv1": 9, "net.conv2": 64, "net.fc1": 128, "net.fc2": 10}  # factorised layer -> full rank
TARGETS = {name: math.ceil(RATIO * full) for name, full in LAYERS.items()}  # {conv1: 3, conv2: 16, fc1: 32, fc2: 3}
MAX_STEPS = 24
STOP_STEP = 19  # the first epoch's last step, with rank updates before it and after it (step 22)


def recipe_text(truncate_at_fit_end: bool) -> str:
    return f"""
trainer:
  callbacks:
    - class_path: lightning_compress.LowRankRefactoring
      init_args: {{rank_ratio: {RATIO}, start_step: 4, end_step: 22, update_every: 3, schedule: linear,
                   truncate_at_fit_end: {str(truncate_at_fit_end).lower()}}}
"""


@pytest.fixture(scope="module")
def uninterrupted_fit(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], FitResult]:
    """The 24-step fit of a strategy, run once per module: it truncates at fit end and saves ``final.ckpt`` after
    ``fit`` returns, and checkpoints at STOP_STEP for the resume tests."""
    return fits_by_strategy(tmp_path_factory.mktemp, recipe_text(truncate_at_fit_end=True), max_steps=MAX_STEPS,
                            checkpoint_every_n_steps=STOP_STEP, save_checkpoint=True)  # fmt: skip


def masks(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each factorised layer's rank mask, by layer name."""
    return {key.removesuffix(".rank_mask"): value for key, value in state_dict.items() if key.endswith(".rank_mask")}


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_every_rank_ends_with_the_same_factors_and_masks_at_the_target_ranks(
    name: str, uninterrupted_fit: Callable[[str], FitResult]
) -> None:
    """Each rank trains on other batches; the components switched off are chosen from the same (gathered) factors, so
    both ranks keep the same ones. At step 24 (past end_step 22) every layer uses exactly its target rank, from the
    full-size factors that ``on_train_end`` still sees: the dense weights are gone, the factors moved and are
    finite."""
    result = uninterrupted_fit(name)
    rank0, rank1 = (r["state_dict"] for r in result.ranks)
    assert [r["global_step"] for r in result.ranks] == [MAX_STEPS, MAX_STEPS]
    assert rank0.keys() == rank1.keys()
    for key, tensor in rank0.items():
        assert torch.equal(tensor, rank1[key]), f"{key} differs between the ranks"
    layer_masks = masks(rank0)
    assert {layer: mask.numel() for layer, mask in layer_masks.items()} == LAYERS
    assert {layer: int(mask.sum()) for layer, mask in layer_masks.items()} == TARGETS
    for layer, full in LAYERS.items():
        assert f"{layer}.weight" not in rank0, f"{layer} is still dense"
        assert rank0[f"{layer}.first"].shape[0] == rank0[f"{layer}.second"].shape[1] == full, layer
        assert f"{layer}.weight" in result.initial, "initial.pt is the dense model before setup"
    for key, tensor in rank0.items():
        assert torch.isfinite(tensor.float()).all(), key


@pytest.mark.parametrize("stage", ["zero1", "zero2", "zero3"])
def test_deepspeed_reaches_the_factors_and_masks_ddp_reaches(
    stage: str, uninterrupted_fit: Callable[[str], FitResult]
) -> None:
    """Same seed, data and optimizer: ZeRO partitions the work, not the math. The masks (chosen by component norms
    computed from the gathered factors) are identical to DDP's, and the factors equal up to float reordering.

    A strategy that chose the components from a shard, or dropped a rank's gradients, would differ here."""
    ddp = uninterrupted_fit("ddp").ranks[0]["state_dict"]
    zero = uninterrupted_fit(stage).ranks[0]["state_dict"]
    assert zero.keys() == ddp.keys()
    for layer, mask in masks(ddp).items():
        assert torch.equal(zero[f"{layer}.rank_mask"], mask), f"{layer}: ZeRO kept other components than DDP"
    for key in ddp:
        torch.testing.assert_close(zero[key], ddp[key], rtol=1e-4, atol=1e-5, msg=lambda m, k=key: f"{k}: {m}")


def test_fit_end_truncates_each_layer_to_its_target_rank_under_ddp(
    uninterrupted_fit: Callable[[str], FitResult],
) -> None:
    """Under DDP fit end replaces each layer by its active components: the model saved after ``fit`` holds factors of
    the target ranks (and no mask left to apply), equal to the active rows and columns of the factors training ended
    with."""
    result = uninterrupted_fit("ddp")
    before = result.ranks[0]["state_dict"]
    saved = saved_module_state(result.out_dir / "final.ckpt")
    for layer, target in TARGETS.items():
        first, second = saved[f"{layer}.first"], saved[f"{layer}.second"]
        assert first.shape[0] == second.shape[1] == target, f"{layer}: {tuple(first.shape)}, {tuple(second.shape)}"
        assert bool(saved[f"{layer}.rank_mask"].all()) and saved[f"{layer}.rank_mask"].numel() == target
        keep = before[f"{layer}.rank_mask"]
        assert torch.equal(first, before[f"{layer}.first"][keep]), layer
        assert torch.equal(second, before[f"{layer}.second"][:, keep]), layer


@pytest.mark.parametrize("stage", ["zero1", "zero2", "zero3"])
def test_deepspeed_leaves_the_factors_full_size_and_its_checkpoint_truncates_after_consolidation(
    stage: str, uninterrupted_fit: Callable[[str], FitResult]
) -> None:
    """Under DeepSpeed the engine and its fp32 master copy own the full-size factors, so fit end does not truncate (it
    says so in the log): a checkpoint saved after fit consolidates (DeepSpeed's zero_to_fp32) into full-size factors
    whose masks hold the target ranks, and truncating that state gives the target ranks with the active components'
    values. (Truncating in place under ZeRO-1/2 once produced checkpoints whose module state and fp32 partitions
    disagreed.)"""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    result = uninterrupted_fit(stage)
    assert "not truncated at fit end" in result.log
    before = result.ranks[0]["state_dict"]
    state = get_fp32_state_dict_from_zero_checkpoint(str(result.out_dir / "final.ckpt"), tag="checkpoint")
    for layer, full in LAYERS.items():
        first, second, mask = state[f"{layer}.first"], state[f"{layer}.second"], state[f"{layer}.rank_mask"]
        assert first.shape[0] == second.shape[1] == mask.numel() == full, layer
        assert int(mask.sum()) == TARGETS[layer], layer
        torch.testing.assert_close(first[mask], before[f"{layer}.first"][mask], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(second[:, mask], before[f"{layer}.second"][:, mask], rtol=1e-6, atol=1e-7)
    from lightning_compress import LowRankRefactoring
    from lightning_compress.models import ImageClassifier

    model = ImageClassifier(in_channels=1, image_size=8, num_classes=10)
    lowrank = LowRankRefactoring(rank_ratio=RATIO, start_step=4, end_step=22, update_every=3)
    lowrank.prepare(model)
    model.load_state_dict(state)
    lowrank.truncate(model)
    assert {layer: model.get_submodule(layer).first.shape[0] for layer in LAYERS} == TARGETS


@pytest.mark.parametrize("name", ["ddp", "zero2", "zero3"])
def test_a_run_resumed_mid_schedule_ends_identical_to_one_never_stopped(
    name: str, uninterrupted_fit: Callable[[str], FitResult], tmp_path: Path
) -> None:
    """Stopped at step 19 (ranks part-way down: the update at 22 is still to come) and resumed by a fresh process
    group: every factor, bias and rank mask ends bitwise equal on both ranks to the run never stopped, and the
    checkpoint carried the target ranks chosen at the first setup.

    Both runs use the same recipe (truncating at fit end); the snapshots compared are taken before truncation."""
    whole = uninterrupted_fit(name)
    stopped_at = whole.out_dir / "checkpoints" / f"step={STOP_STEP}.ckpt"
    assert stopped_at.exists(), f"no checkpoint at step {STOP_STEP}"
    at_stop = checkpoint_contents(stopped_at)
    assert at_stop["callbacks"] == {"target_ranks": TARGETS}
    stop_masks = masks(at_stop["module"])
    final_masks = masks(whole.ranks[0]["state_dict"])
    assert stop_masks.keys() == final_masks.keys() == LAYERS.keys()
    assert all(TARGETS[layer] < int(mask.sum()) < LAYERS[layer] for layer, mask in stop_masks.items()), stop_masks
    assert all(int(final_masks[layer].sum()) < int(mask.sum()) for layer, mask in stop_masks.items())

    spec = FitSpec(**STRATEGIES[name], max_steps=MAX_STEPS, recipe=whole.spec.recipe, resume_from=str(stopped_at))
    resumed = run_fit(spec, tmp_path / "resumed")
    for rank in range(2):
        expected, got = whole.ranks[rank], resumed.ranks[rank]
        assert got["global_step"] == expected["global_step"] == MAX_STEPS
        assert got["state_dict"].keys() == expected["state_dict"].keys()
        for key, tensor in expected["state_dict"].items():
            assert torch.equal(got["state_dict"][key], tensor), f"rank {rank}: {key} differs after resume"


def saved_module_state(path: Path) -> dict[str, torch.Tensor]:
    """The module state a Lightning checkpoint holds; for a DeepSpeed folder, its model-states file's ``module``
    (whole weights under ZeRO-1/2, empty partitions but whole buffers under ZeRO-3)."""
    return checkpoint_contents(path)["module"]


def checkpoint_contents(path: Path) -> dict[str, dict]:
    """``module`` (the module state) and ``callbacks`` (the LowRankRefactoring state) of a checkpoint file or a
    DeepSpeed checkpoint folder."""
    if path.is_dir():
        states = sorted(path.rglob("*mp_rank_00_model_states.pt"))[0]  # ZeRO-3 writes one per rank, ZeRO-1/2 one
        checkpoint = torch.load(states, map_location="cpu", weights_only=False)
        module = checkpoint["module"]
    else:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
        module = checkpoint["state_dict"]
    [lowrank] = [state for key, state in checkpoint["callbacks"].items() if key.startswith("LowRankRefactoring")]
    return {"module": module, "callbacks": lowrank}


# ------------------------------------------------------------------------------------ activation-aware (calibrated)
CALIBRATED_RECIPE = f"""
trainer:
  callbacks:
    - class_path: lightning_compress.LowRankRefactoring
      init_args: {{rank_ratio: {RATIO}, calibration_steps: 4, start_step: 8, end_step: 22, update_every: 3,
                   schedule: linear, truncate_at_fit_end: false}}
"""
# Input statistics over steps 5-8 (every rank's batches, all-reduced once, at the window's end), rebase at 8 (factors,
# DeepSpeed's fp32 masters and Adam's moments), rank updates at 8, 11, ..., 20, 22 judged by the hidden components'
# energy since the previous update. The stop at 19 falls mid-ramp, with that energy in the checkpoint.


@pytest.fixture(scope="module")
def calibrated_fit(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., FitResult]:
    return fits_by_strategy(tmp_path_factory.mktemp, CALIBRATED_RECIPE, max_steps=MAX_STEPS,
                            checkpoint_every_n_steps=STOP_STEP)  # fmt: skip


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_calibrated_ranks_agree_and_reach_the_targets(name: str, calibrated_fit: Callable[[str], FitResult]) -> None:
    """Every rank rebased on the same (all-reduced) statistics and switched off the same components."""
    result = calibrated_fit(name)
    rank0, rank1 = (r["state_dict"] for r in result.ranks)
    assert rank0.keys() == rank1.keys()
    for key, tensor in rank0.items():
        assert torch.equal(tensor, rank1[key]), f"{key} differs between the ranks"
        assert torch.isfinite(tensor.float()).all(), key
    assert {layer: int(mask.sum()) for layer, mask in masks(rank0).items()} == TARGETS
    assert "rebased 4 layers on their input statistics (the batches of steps 5-8)" in result.log


@pytest.mark.parametrize("name", ["ddp", "zero3"])
def test_statistics_summed_over_the_ranks_once_give_the_rebase_summing_every_batch_gives(
    name: str, calibrated_fit: Callable[..., FitResult]
) -> None:
    """The ranks add up their input statistics once, at the window's end (float64 sums of each batch's float32
    products), instead of at every batch: the same totals, so bitwise the same rebase and everything after it."""
    once, every_batch = calibrated_fit(name), calibrated_fit(name, sync_statistics_every_batch=True)
    for rank in range(2):
        expected, got = every_batch.ranks[rank]["state_dict"], once.ranks[rank]["state_dict"]
        assert got.keys() == expected.keys()
        for key, tensor in expected.items():
            assert torch.equal(got[key], tensor), f"rank {rank}: {key} differs"


@pytest.mark.parametrize("stage", ["zero1", "zero2", "zero3"])
def test_calibrated_deepspeed_reaches_what_ddp_reaches(stage: str, calibrated_fit: Callable[[str], FitResult]) -> None:
    """The rebase under ZeRO reads the fp32 masters and carries Adam's moments through DeepSpeed's partitioned
    optimizer state; under DDP through torch's. Same statistics, same math: same components kept, same factors."""
    ddp = calibrated_fit("ddp").ranks[0]["state_dict"]
    zero = calibrated_fit(stage).ranks[0]["state_dict"]
    assert zero.keys() == ddp.keys()
    for layer, mask in masks(ddp).items():
        assert torch.equal(zero[f"{layer}.rank_mask"], mask), f"{layer}: ZeRO kept other components than DDP"
    for key in ddp:
        torch.testing.assert_close(zero[key], ddp[key], rtol=1e-4, atol=1e-5, msg=lambda m, k=key: f"{k}: {m}")


@pytest.mark.parametrize("name", ["ddp", "zero2", "zero3"])
def test_a_calibrated_run_resumed_mid_ramp_ends_identical_to_one_never_stopped(
    name: str, calibrated_fit: Callable[[str], FitResult], tmp_path: Path
) -> None:
    whole = calibrated_fit(name)
    stopped_at = whole.out_dir / "checkpoints" / f"step={STOP_STEP}.ckpt"
    state = checkpoint_contents(stopped_at)["callbacks"]
    assert state["rebased"] is True and state["target_ranks"] == TARGETS
    assert {stats["kind"] for stats in state["statistics"].values()} == {"hidden"} and state["statistics"]
    spec = FitSpec(**STRATEGIES[name], max_steps=MAX_STEPS, recipe=whole.spec.recipe, resume_from=str(stopped_at))
    resumed = run_fit(spec, tmp_path / "resumed")
    for rank in range(2):
        expected, got = whole.ranks[rank]["state_dict"], resumed.ranks[rank]["state_dict"]
        assert got.keys() == expected.keys()
        for key, tensor in expected.items():
            assert torch.equal(got[key], tensor), f"rank {rank}: {key} differs after resume"
