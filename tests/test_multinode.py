"""Multi-node without SLURM: two ``torchrun --nnodes=2 --node-rank={0,1}`` on this host, one rank each, under DDP and
DeepSpeed ZeRO-2 and ZeRO-3, with every compression callback at once: low-rank (calibrated) on fc1, gradual pruning
on conv2 and fc2, QAT on all four layers, adaptive clipping, warm-up with re-warm on every event, and the monitor.

Each node is its own torchrun, as on two hosts; Lightning reads the ranks from torchrun's environment and starts no
process itself. The ranks must agree (the same weights, masks, factors and observer ranges on both nodes), the
schedules must reach their targets, and the two-node DDP job must train bitwise the model that one node with two
ranks trains. A ZeRO-3 job whose rank 1 alone receives SIGUSR1 mid-epoch and mid-schedule saves once on both nodes,
stops, and resumes (a new pair of torchrun, ``ckpt_path="hpc"``) to bitwise the model of the job never stopped.

An epoch is 19 steps (2 ranks x 32 of 1,168 digits); the 24 steps cross an epoch boundary.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import pytest
import torch
from launch import STRATEGIES, FitResult, FitSpec, run_fit, run_torchrun_fit

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

MAX_STEPS = 24
RECIPE = """
trainer:
  callbacks:
    - class_path: lightning_compress.LowRankRefactoring
      init_args: {rank_ratio: 0.25, include: ['net\\.fc1'], calibration_steps: 3, start_step: 4, end_step: 16,
                  update_every: 4, schedule: linear}
    - class_path: lightning_compress.GradualPruning
      init_args: {target_sparsity: 0.75, include: ['net\\.conv2', 'net\\.fc2'], start_step: 4, end_step: 16,
                  update_every: 4, scope: global}
    - class_path: lightning_compress.QuantizationAwareTraining
      init_args: {weight_bits: 8, activation_bits: 8, start_step: 6, freeze_observers_step: 18}
    - class_path: lightning_compress.GradientClipping
      init_args: {mode: adaptive, percentile: 50, history: 10, event_steps: 2}
    - class_path: lightning_compress.LearningRateWarmup
      init_args: {warmup_steps: 3, rewarm_on: [lowrank, masks, quantize], rewarm_steps: 2, rewarm_factor: 0.5}
"""
FC1_FULL_RANK, FC1_TARGET_RANK = 128, 32


@pytest.fixture(scope="module")
def fits(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., FitResult]:
    """``fits(strategy, nodes)``: the 24-step fit of RECIPE on ``nodes`` torchrun nodes of one rank each (or, with
    ``nodes=1``, one node of two ranks started by Lightning), run once per module on first use."""
    recipe = tmp_path_factory.mktemp("recipe") / "recipe.yaml"
    recipe.write_text(RECIPE)
    done: dict[tuple[str, int], FitResult] = {}

    def get(name: str, nodes: int = 2) -> FitResult:
        if (name, nodes) not in done:
            where = {**STRATEGIES[name], "devices": 2 // nodes, "num_nodes": nodes}
            spec = FitSpec(**where, max_steps=MAX_STEPS, recipe=str(recipe), monitor=True)
            folder = tmp_path_factory.mktemp(f"{name}-{nodes}nodes")
            done[(name, nodes)] = run_torchrun_fit(spec, folder) if nodes > 1 else run_fit(spec, folder)
        return done[(name, nodes)]

    return get


MULTINODE = ["ddp", "zero2", "zero3"]


@pytest.mark.parametrize("name", MULTINODE)
def test_each_node_runs_one_rank_of_a_world_of_two_to_the_last_step(name: str, fits: Callable[..., FitResult]) -> None:
    ranks = fits(name).ranks
    assert [(r["world_size"], r["node_rank"], r["local_rank"]) for r in ranks] == [(2, 0, 0), (2, 1, 0)]
    assert [r["global_step"] for r in ranks] == [MAX_STEPS, MAX_STEPS]


@pytest.mark.parametrize("name", MULTINODE)
def test_both_nodes_end_with_the_same_weights_masks_factors_and_observers(
    name: str, fits: Callable[..., FitResult]
) -> None:
    node0, node1 = (r["state_dict"] for r in fits(name).ranks)
    assert node0.keys() == node1.keys()
    assert any(key.endswith("rank_mask") for key in node0) and any("observer" in key for key in node0)
    different = [key for key in node0 if not torch.equal(node0[key], node1[key])]
    assert different == []


@pytest.mark.parametrize("name", MULTINODE)
def test_every_schedule_reaches_its_target(name: str, fits: Callable[..., FitResult]) -> None:
    state = fits(name).ranks[0]["state_dict"]
    assert int(state["net.fc1.rank_mask"].sum()) == FC1_TARGET_RANK
    assert state["net.fc1.rank_mask"].numel() == FC1_FULL_RANK
    pruned = [weight for key, weight in state.items() if key.startswith(("net.conv2.", "net.fc2.")) and "weight" in key
              and weight.dim() > 1]  # fmt: skip
    zeros = sum(int((w == 0).sum()) for w in pruned)
    assert zeros / sum(w.numel() for w in pruned) == pytest.approx(0.75, abs=0.01)


def test_the_monitor_on_node_zero_logs_the_compressed_model(fits: Callable[..., FitResult]) -> None:
    import csv

    rows = list(csv.DictReader((fits("ddp").out_dir / "csv" / "version_0" / "metrics.csv").open()))
    sparsity = [float(row["compress/weight_sparsity"]) for row in rows if row.get("compress/weight_sparsity")]
    assert sparsity and sparsity[-1] > 0.5


def test_two_nodes_train_bitwise_the_model_one_node_of_two_ranks_trains(fits: Callable[..., FitResult]) -> None:
    two_nodes = fits("ddp").ranks[0]["state_dict"]
    one_node = fits("ddp", nodes=1).ranks[0]["state_dict"]
    assert two_nodes.keys() == one_node.keys()
    assert [key for key in two_nodes if not torch.equal(two_nodes[key], one_node[key])] == []


SIGNAL_STEP = 10  # mid-epoch; mid ramp for low-rank and pruning, QAT observers live


def test_a_zero3_job_signalled_on_one_node_stops_on_both_and_resumes_bitwise(
    fits: Callable[..., FitResult], tmp_path_factory: pytest.TempPathFactory
) -> None:
    whole = fits("zero3")
    folder = tmp_path_factory.mktemp("zero3-preempted")
    preempted = replace(whole.spec, preemption=True, signal_at_step=SIGNAL_STEP, signal_rank=1)
    stopped = run_torchrun_fit(preempted, folder)
    assert [(r["global_step"], r.get("preempted")) for r in stopped.ranks] == [(SIGNAL_STEP + 1, True)] * 2
    checkpoint = folder / "hpc_ckpt_1.ckpt"
    assert checkpoint.is_dir() and [p.name for p in folder.glob("*ckpt*")] == ["hpc_ckpt_1.ckpt"]
    resumed = run_torchrun_fit(replace(preempted, signal_at_step=None, resume_from="hpc"), folder)
    assert [r["global_step"] for r in resumed.ranks] == [MAX_STEPS, MAX_STEPS]
    assert f"Restored all states from the checkpoint at {checkpoint}" in resumed.log
    expected, found = whole.ranks[0]["state_dict"], resumed.ranks[0]["state_dict"]
    assert expected.keys() == found.keys()
    assert [key for key in expected if not torch.equal(expected[key], found[key])] == []
