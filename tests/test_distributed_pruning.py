"""GradualPruning under real DDP and DeepSpeed ZeRO-1/2/3 fits with 2 CPU processes (Adam, lr 1e-3, 24 steps).

A MaskWatch checks after every optimizer step that the pruned weights are exactly zero in the module and, under
DeepSpeed, in the optimizer's fp32 master copy, where an in-place mask alone is erased by the next step.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from launch import STRATEGIES, FitResult, FitSpec, fits_by_strategy, run_fit

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

TARGET = 0.8
RECIPE = f"""
trainer:
  callbacks:
    - class_path: lightning_compress.GradualPruning
      init_args: {{target_sparsity: {TARGET}, start_step: 0, end_step: 16, update_every: 4}}
"""


@pytest.fixture(scope="module")
def pruned_fit(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., FitResult]:
    """``pruned_fit(name, mask_module_only=False)``: the 24-step pruning fit of a strategy, run once per module."""
    return fits_by_strategy(tmp_path_factory.mktemp, RECIPE, max_steps=24, watch_masks=True, save_checkpoint=True)


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_pruned_weights_are_zero_after_every_step_in_module_and_fp32_master(
    name: str, pruned_fit: Callable[..., FitResult]
) -> None:
    for rank, result in enumerate(pruned_fit(name).ranks):
        checks = result["mask_checks"]
        assert [c["step"] for c in checks] == list(range(1, 25)), f"rank {rank} missed steps"
        assert all(c["module_nonzeros_under_mask"] == 0 for c in checks), f"rank {rank}: {checks}"
        assert all(c["master_checked"] == (name != "ddp") for c in checks)
        assert all(c["master_nonzeros_under_mask"] == 0 for c in checks), f"rank {rank}: {checks}"
        assert checks[-1]["sparsity"] == pytest.approx(TARGET, abs=0.005)


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_every_rank_holds_the_same_masks_and_weights(name: str, pruned_fit: Callable[..., FitResult]) -> None:
    rank0, rank1 = pruned_fit(name).ranks
    assert rank0["masks"].keys() == rank1["masks"].keys() and rank0["masks"]
    for key in rank0["masks"]:
        assert torch.equal(rank0["masks"][key], rank1["masks"][key]), key
    for key in rank0["state_dict"]:
        assert torch.equal(rank0["state_dict"][key], rank1["state_dict"][key]), key


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_the_saved_checkpoint_holds_the_zeros(name: str, pruned_fit: Callable[..., FitResult]) -> None:
    result = pruned_fit(name)
    saved = checkpoint_weights(result.out_dir / "final.ckpt")
    masks = result.ranks[0]["masks"]
    for key, mask in masks.items():
        assert saved[key].shape == mask.shape, key
        assert torch.count_nonzero(saved[key][~mask]) == 0, f"{key} has non-zeros under its mask in the checkpoint"
    total = sum(m.numel() for k, m in masks.items() if k.endswith("weight"))
    zeros = sum(int((saved[k] == 0).sum()) for k in masks if k.endswith("weight"))
    assert zeros / total >= TARGET - 0.005


def test_zero3_parameters_kept_whole_are_masked_where_forward_reads_them(pruned_fit: Callable[..., FitResult]) -> None:
    """DeepSpeed's default keeps every parameter under 1e5 elements whole on each rank besides its shard, and forward
    reads that copy: the masks must reach it (they once reached the shards alone, and forward saw pruned weights)."""
    result = pruned_fit("zero3", zero3_persistence_threshold=100_000)
    for rank, ranks_result in enumerate(result.ranks):
        checks = ranks_result["mask_checks"]
        assert [c["step"] for c in checks] == list(range(1, 25))
        assert all(c["module_nonzeros_under_mask"] == c["master_nonzeros_under_mask"] == 0 for c in checks), rank
        assert checks[-1]["sparsity"] == pytest.approx(TARGET, abs=0.005)


@pytest.mark.parametrize("name", ["zero2", "zero3"])
def test_the_deepspeed_checkpoint_holds_the_full_masks(name: str, pruned_fit: Callable[..., FitResult]) -> None:
    """DeepSpeed writes the callbacks' state with the model states (ZeRO-3: one file per rank, each read back by its
    rank on resume). Each holds every rank's part of the masks, full-shaped (packed 8 to a byte): a state that does
    not depend on the number of ranks."""
    from lightning_compress.packing import unpack_mask

    result = pruned_fit(name)
    files = sorted((result.out_dir / "final.ckpt" / "checkpoint").glob("*model_states.pt"))
    assert len(files) == (2 if name == "zero3" else 1), files
    masks = result.ranks[0]["masks"]
    for path in files:
        client = torch.load(path, weights_only=False)
        (state,) = [v for k, v in client["callbacks"].items() if k.startswith("GradualPruning")]
        assert state["masks"].keys() == masks.keys() and masks
        for key, mask in masks.items():
            saved = state["masks"][key]
            assert saved["shape"] == list(mask.shape), key
            assert torch.equal(unpack_mask(saved["bits"], mask.numel()).view(mask.shape), mask), (path.name, key)
        assert state["mask_sparsity"] == TARGET


def test_negative_control_a_module_only_mask_is_erased_by_zero2(pruned_fit: Callable[..., FitResult]) -> None:
    """The check above can fail: writing masks into the module alone (no fp32 master) leaves non-zeros."""
    checks = pruned_fit("zero2", mask_module_only=True).ranks[0]["mask_checks"]
    assert sum(c["master_nonzeros_under_mask"] for c in checks) > 0


def checkpoint_weights(path: Path) -> dict[str, torch.Tensor]:
    """Full fp32 weights from a Lightning checkpoint file, or from a DeepSpeed checkpoint folder's ZeRO shards."""
    if path.is_dir():
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(path), tag="checkpoint")
    return torch.load(path, map_location="cpu", weights_only=False)["state_dict"]


@pytest.mark.parametrize("name", ["ddp", "zero2", "zero3"])
def test_a_run_resumed_mid_schedule_ends_identical_to_one_never_stopped(name: str, tmp_path: Path) -> None:
    """Stopped at step 19 (the epoch's last batch: 2 ranks x 32 of 1,168 images), mid-way through a schedule that
    updates the masks every 3 steps until step 22."""
    recipe = tmp_path / "prune.yaml"
    recipe.write_text(RECIPE.replace("end_step: 16, update_every: 4", "end_step: 22, update_every: 3"))
    common = {**STRATEGIES[name], "max_steps": 24, "recipe": str(recipe), "watch_masks": True}
    whole = run_fit(FitSpec(**common, checkpoint_every_n_steps=19), tmp_path / "whole")
    stopped_at = whole.out_dir / "checkpoints" / "step=19.ckpt"
    resumed = run_fit(FitSpec(**common, resume_from=str(stopped_at)), tmp_path / "resumed")
    for rank in range(2):
        expected, got = whole.ranks[rank], resumed.ranks[rank]
        assert got["global_step"] == expected["global_step"] == 24
        for key, tensor in expected["state_dict"].items():
            assert torch.equal(got["state_dict"][key], tensor), f"rank {rank}: {key} differs after resume"
        for key, mask in expected["masks"].items():
            assert torch.equal(got["masks"][key], mask), f"rank {rank}: mask {key} differs after resume"
        assert [c["step"] for c in got["mask_checks"]] == list(range(20, 25))
        assert all(c["module_nonzeros_under_mask"] == c["master_nonzeros_under_mask"] == 0 for c in got["mask_checks"])


@pytest.mark.parametrize("name", ["ddp", "zero3"])
def test_the_monitor_measures_full_layers_from_rank_zero(name: str, tmp_path: Path) -> None:
    """Under ZeRO-3 a rank holds shards; the monitor must still count full layers, and log once."""
    import csv

    recipe = tmp_path / "prune.yaml"
    recipe.write_text(RECIPE)
    result = run_fit(FitSpec(**STRATEGIES[name], max_steps=24, recipe=str(recipe), monitor=True), tmp_path / "fit")
    with (result.out_dir / "csv" / "version_0" / "metrics.csv").open() as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("compress/params_dense")]
    steps = [int(row["step"]) for row in rows]
    assert steps == sorted(steps) and len(steps) == len(set(steps)) + 1  # one row per step; fit end repeats 24
    params = sum(t.numel() for k, t in result.ranks[0]["state_dict"].items() if "acc" not in k)
    assert {float(row["compress/params_dense"]) for row in rows} == {params}
    assert float(rows[0]["compress/weight_sparsity"]) == 0.0
    assert float(rows[-1]["compress/weight_sparsity"]) == pytest.approx(TARGET, abs=0.005)
    assert float(rows[-1]["compress/flops_effective"]) < 0.3 * float(rows[-1]["compress/flops_dense"])
