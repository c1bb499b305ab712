"""Real fits through Lightning: DDP and DeepSpeed ZeRO-1/2/3 with 2 CPU processes, and ZeRO-1/2/3 with one.

Each fit runs the reference CNN on the digits data in a fresh process tree (harness/fit_worker.py). Every rank
writes its full view of the weights after training (gathered under ZeRO-3); the tests compare the ranks.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from launch import FitResult, FitSpec, run_fit

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

STRATEGIES = {
    "ddp": FitSpec(strategy="ddp"),
    "zero1": FitSpec(strategy="deepspeed", zero_stage=1),
    "zero2": FitSpec(strategy="deepspeed", zero_stage=2),
    "zero3": FitSpec(strategy="deepspeed", zero_stage=3),
    "zero1-1proc": FitSpec(strategy="deepspeed", zero_stage=1, devices=1),
    "zero2-1proc": FitSpec(strategy="deepspeed", zero_stage=2, devices=1),
    "zero3-1proc": FitSpec(strategy="deepspeed", zero_stage=3, devices=1),
}
TWO_PROCESS = [name for name, spec in STRATEGIES.items() if spec.devices == 2]


@pytest.fixture(scope="module")
def fits(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], FitResult]:
    """Runs each strategy's fit once per module, on first use."""
    done: dict[str, FitResult] = {}

    def get(name: str) -> FitResult:
        if name not in done:
            done[name] = run_fit(STRATEGIES[name], tmp_path_factory.mktemp(name))
        return done[name]

    return get


@pytest.fixture(params=list(STRATEGIES))
def any_fit(request: pytest.FixtureRequest, fits: Callable[[str], FitResult]) -> FitResult:
    return fits(request.param)


@pytest.fixture(params=TWO_PROCESS)
def two_process_fit(request: pytest.FixtureRequest, fits: Callable[[str], FitResult]) -> FitResult:
    return fits(request.param)


def test_every_rank_trained_all_steps(any_fit: FitResult) -> None:
    devices = any_fit.spec.devices
    assert [r["world_size"] for r in any_fit.ranks] == [devices] * devices
    assert [r["global_step"] for r in any_fit.ranks] == [any_fit.spec.max_steps] * devices


def test_both_ranks_end_with_identical_full_weights(two_process_fit: FitResult) -> None:
    rank0, rank1 = (r["state_dict"] for r in two_process_fit.ranks)
    assert rank0.keys() == rank1.keys()
    for name, tensor in rank0.items():
        assert torch.equal(tensor, rank1[name]), f"{name} differs between rank 0 and rank 1"


def test_training_changed_every_parameter_to_finite_values(any_fit: FitResult) -> None:
    final = any_fit.ranks[0]["state_dict"]
    assert final.keys() == any_fit.initial.keys()
    for name, tensor in final.items():
        assert tensor.shape == any_fit.initial[name].shape, f"{name} is not full-size"
        assert torch.isfinite(tensor).all(), f"{name} has non-finite values"
        assert not torch.equal(tensor, any_fit.initial[name]), f"{name} never moved: no optimizer step ran"


@pytest.mark.parametrize("stage", ["zero1", "zero2", "zero3"])
def test_deepspeed_reaches_the_weights_ddp_reaches(stage: str, fits: Callable[[str], FitResult]) -> None:
    """Same seed, data and optimizer: ZeRO partitions the work, not the math (equal up to float reordering).

    Weights that differ here would mean a strategy dropped or double-counted a rank's gradients.
    """
    ddp = fits("ddp").ranks[0]["state_dict"]
    zero = fits(stage).ranks[0]["state_dict"]
    for name in ddp:
        torch.testing.assert_close(zero[name], ddp[name], rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
