"""GradientClipping and LearningRateWarmup under real DDP and DeepSpeed ZeRO-1/2/3 fits with 2 CPU processes.

Each 2-process fit (batch 32 per rank) must reach the weights of the single-process fit with batch 64 over the same
samples (DDP with one process: the same DistributedSampler order), within 1e-4: every rank clipped the all-reduced
(or, under ZeRO, the partitioned) gradients alike, at the same threshold. The negative control shows the clipping
was real: the reference clipped most steps and ends far from the unclipped fit. Under ZeRO-2, a run stopped mid
warm-up, mid re-warm and mid hold resumes bitwise.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from launch import STRATEGIES, FitResult, FitSpec, run_fit
from stabilizer_taps import logged

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

STEPS = 8
CLIPPING = {  # thresholds low enough that most steps of the reference are clipped
    "norm": "{mode: norm, max_norm: 0.05}",
    "value": "{mode: value, max_value: 0.001}",
    "agc": "{mode: agc, clip_factor: 0.002}",
    "adaptive": "{mode: adaptive, percentile: 20, history: 10}",
}


def recipe(mode: str | None) -> str:
    callbacks = (
        ""
        if mode is None
        else f"""
    - class_path: lightning_compress.GradientClipping
      init_args: {CLIPPING[mode]}
    - class_path: lightning_compress.LearningRateWarmup
      init_args: {{warmup_steps: 4, rewarm_on: []}}"""
    )
    return f"trainer:\n  callbacks:{callbacks or ' []'}\n"


@pytest.fixture(scope="module")
def fits(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., FitResult]:
    """``fits(strategy, mode)``: the 2-process fit; ``fits("single", mode)``: the 1-process reference at batch 64;
    run once per module, on first use. ``mode=None``: no stabiliser."""
    done: dict[tuple[str, str | None], FitResult] = {}

    def get(name: str, mode: str | None) -> FitResult:
        if (name, mode) not in done:
            folder = tmp_path_factory.mktemp(f"{name}-{mode}")
            (folder / "recipe.yaml").write_text(recipe(mode))
            where = {"strategy": "ddp", "devices": 1, "batch_size": 64} if name == "single" else STRATEGIES[name]
            spec = FitSpec(**where, max_steps=STEPS, recipe=str(folder / "recipe.yaml"), csv_log=True)
            done[(name, mode)] = run_fit(spec, folder / "fit")
        return done[(name, mode)]

    return get


@pytest.mark.parametrize("mode", list(CLIPPING))
@pytest.mark.parametrize("name", list(STRATEGIES))
def test_two_processes_clip_as_one_process_does(name: str, mode: str, fits: Callable[..., FitResult]) -> None:
    reference, result = fits("single", mode), fits(name, mode)
    expected = reference.ranks[0]["state_dict"]
    for rank in result.ranks:
        for key, tensor in rank["state_dict"].items():
            torch.testing.assert_close(tensor, expected[key], rtol=1e-4, atol=1e-5, msg=lambda m, k=key: f"{k}: {m}")
    for metric in ("stabilize/grad_norm", "stabilize/clip_threshold", "stabilize/clipped", "stabilize/lr_factor"):
        got, want = logged(result.out_dir / "csv", metric), logged(reference.out_dir / "csv", metric)
        assert sorted(got) == list(range(STEPS)), metric
        assert [got[s] for s in range(STEPS)] == pytest.approx([want[s] for s in range(STEPS)], rel=1e-4), metric


@pytest.mark.parametrize("mode", list(CLIPPING))
def test_negative_control_the_reference_really_clipped(mode: str, fits: Callable[..., FitResult]) -> None:
    reference = fits("single", mode)
    clipped = logged(reference.out_dir / "csv", "stabilize/clipped")
    assert sum(clipped.values()) >= STEPS // 2, f"{mode} clipped only {sum(clipped.values())} of {STEPS} steps"
    unclipped = fits("single", None).ranks[0]["state_dict"]
    distance = max(float((t - unclipped[k]).abs().max()) for k, t in reference.ranks[0]["state_dict"].items())
    assert distance > 1e-2, f"{mode}: clipping moved the weights only {distance:.2e} from the unclipped fit"


RESUME_RECIPE = """
trainer:
  callbacks:
    - class_path: lightning_compress.LearningRateWarmup
      init_args: {warmup_steps: 22, rewarm_on: [masks], rewarm_steps: 10, rewarm_factor: 0.2}
    - class_path: lightning_compress.GradientClipping
      init_args: {mode: adaptive, percentile: 50, history: 20, event_steps: 8}
    - class_path: lightning_compress.GradualPruning
      init_args: {target_sparsity: 0.8, start_step: 15, end_step: 16, schedule: constant}
"""


def test_zero2_resume_mid_warmup_mid_rewarm_and_mid_hold_is_bitwise(tmp_path: Path) -> None:
    """Steps 19 of 24: 19 of 22 warm-up steps, 4 of 10 re-warm steps, 4 of 8 held steps (the epoch's last batch,
    from which a plain DataLoader resumes exactly)."""
    (tmp_path / "recipe.yaml").write_text(RESUME_RECIPE)
    common = {**STRATEGIES["zero2"], "max_steps": 24, "recipe": str(tmp_path / "recipe.yaml")}
    whole = run_fit(FitSpec(**common, checkpoint_every_n_steps=19), tmp_path / "whole")
    stopped_at = whole.out_dir / "checkpoints" / "step=19.ckpt"
    resumed = run_fit(FitSpec(**common, resume_from=str(stopped_at)), tmp_path / "resumed")
    for a, b in zip(whole.ranks, resumed.ranks, strict=True):
        assert b["global_step"] == 24
        for key, tensor in a["state_dict"].items():
            assert torch.equal(tensor, b["state_dict"][key]), key
