"""QuantizationAwareTraining under real DDP and DeepSpeed ZeRO-2/3 with 2 CPU processes: every rank must end with the
same scales."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from launch import FitSpec, run_fit

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

RECIPE = """
trainer:
  callbacks:
    - class_path: lightning_compress.quantization.callback.QuantizationAwareTraining
      init_args: {weight_bits: 8, activation_bits: 8, start_step: 4, freeze_observers_step: 16}
"""


@pytest.mark.parametrize(
    "strategy",
    [{"strategy": "ddp"}, {"strategy": "deepspeed", "zero_stage": 2}, {"strategy": "deepspeed", "zero_stage": 3}],
    ids=["ddp", "zero2", "zero3"],
)
def test_ranks_hold_identical_weights_and_observer_ranges(strategy: dict, tmp_path: Path) -> None:
    """Each rank sees other batches; the activation ranges are reduced across ranks so the quantizers agree."""
    recipe = tmp_path / "qat.yaml"
    recipe.write_text(RECIPE)
    rank0, rank1 = run_fit(FitSpec(**strategy, max_steps=20, recipe=str(recipe)), tmp_path / "fit").ranks
    observers = [key for key in rank0["state_dict"] if "input_observer" in key]
    assert observers, "no activation observer in the state dict"
    for key, tensor in rank0["state_dict"].items():
        assert torch.equal(tensor, rank1["state_dict"][key]), f"{key} differs between the ranks"
    assert all(torch.isfinite(rank0["state_dict"][key]).all() for key in observers)
