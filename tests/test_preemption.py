"""PreemptionCheckpoint in one process: the signal only sets a flag; the next optimizer step saves one checkpoint and
ends the fit; a fresh Trainer resumes from it and ends bitwise equal to a run never stopped, mid-epoch and
mid-schedule (pruning ramp, QAT observers, clipping history); a checkpoint changed after it was written, or written
by another job, is refused by name before anything is loaded.

The digits epoch is 19 steps, so step 27 is in the middle of the second epoch: a plain DataLoader would resume there
at the epoch's first batch (the negative control shows the difference is seen).
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from digits_fits import fit
from signal_at import SignalAt

from lightning_compress import (
    CheckpointRefused,
    GradientClipping,
    GradualPruning,
    LearningRateWarmup,
    LowRankRefactoring,
    PreemptionCheckpoint,
    QuantizationAwareTraining,
)
from lightning_compress._lightning import Callback, pl
from lightning_compress.data import DigitsDataModule
from lightning_compress.models import ImageClassifier

MAX_STEPS = 40
SIGNAL_STEP = 26  # the signal arrives during step 26; the checkpoint holds 27 steps


def compression() -> list[Callback]:
    return [
        GradualPruning(0.8, start_step=10, end_step=35, update_every=5),
        QuantizationAwareTraining(weight_bits=8, activation_bits=8, start_step=12, freeze_observers_step=32),
        GradientClipping("adaptive", percentile=50, history=20),
    ]


def every_technique() -> list[Callback]:
    """All three techniques and both stabilisers, the preemption inside low-rank's calibration window (steps 25-29)
    and inside a re-warm (pruning's update at step 25 re-warms 25-28), listed last technique first."""
    return [
        LearningRateWarmup(warmup_steps=3, rewarm_on=["lowrank", "masks", "quantize"], rewarm_steps=4),
        GradientClipping("adaptive", percentile=50, history=20),
        QuantizationAwareTraining(weight_bits=8, activation_bits=8, start_step=12, freeze_observers_step=32),
        GradualPruning(0.8, include=[r"net\.conv2", r"net\.fc2"], start_step=10, end_step=35, update_every=5),
        LowRankRefactoring(
            rank_ratio=0.25, include=[r"net\.fc1"], calibration_steps=5, start_step=30, end_step=38, update_every=4
        ),
    ]


def preempted_then_resumed(
    quiet: dict[str, Any], callbacks: Callable[[], list[Callback]] = compression, **preemption: Any
) -> tuple[ImageClassifier, PreemptionCheckpoint]:
    """A fit preempted at ``SIGNAL_STEP``, then a fresh model and Trainer resumed from the preemption checkpoint."""
    first = PreemptionCheckpoint(**preemption)
    fit(quiet, [*callbacks(), first, SignalAt(SIGNAL_STEP)], MAX_STEPS)
    assert first.saved is not None, "the fit was not preempted"
    pl.seed_everything(1)  # the resumed run must not depend on the state a fresh process starts in
    resumed = ImageClassifier(image_size=8)
    trainer = pl.Trainer(max_steps=MAX_STEPS, callbacks=[PreemptionCheckpoint(**preemption), *callbacks()], **quiet)
    trainer.fit(resumed, datamodule=DigitsDataModule(), ckpt_path="hpc")
    return resumed, first


def assert_bitwise_equal(a: torch.nn.Module, b: torch.nn.Module) -> None:
    state_b = b.state_dict()
    for name, tensor in a.state_dict().items():
        assert torch.equal(tensor, state_b[name]), name


@pytest.mark.slow
def test_a_preempted_fit_resumes_mid_epoch_bitwise_equal_to_one_never_stopped(
    quiet_trainer_kwargs: dict[str, Any], tmp_path: Path
) -> None:
    whole = fit(quiet_trainer_kwargs, compression(), MAX_STEPS)
    resumed, first = preempted_then_resumed(quiet_trainer_kwargs)
    assert first.saved == tmp_path / "hpc_ckpt_1.ckpt"
    assert torch.load(first.saved, weights_only=True)["global_step"] == SIGNAL_STEP + 1
    assert_bitwise_equal(whole, resumed)


@pytest.mark.slow
def test_every_technique_and_stabiliser_resumes_bitwise_from_mid_calibration_and_mid_rewarm(
    quiet_trainer_kwargs: dict[str, Any],
) -> None:
    whole = fit(quiet_trainer_kwargs, every_technique(), MAX_STEPS)
    resumed, _ = preempted_then_resumed(quiet_trainer_kwargs, every_technique)
    assert any(name.endswith("rank_mask") for name in whole.state_dict()), "low-rank never factorised"
    assert_bitwise_equal(whole, resumed)


@pytest.mark.slow
def test_with_a_plain_dataloader_the_same_resume_is_not_exact(
    quiet_trainer_kwargs: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The negative control: the stateful training loader is what makes the mid-epoch resume exact."""
    import lightning_compress.data._loaders as loaders

    whole = fit(quiet_trainer_kwargs, compression(), MAX_STEPS)
    monkeypatch.setattr(loaders, "StatefulDataLoader", torch.utils.data.DataLoader)
    resumed, _ = preempted_then_resumed(quiet_trainer_kwargs)
    differs = [n for n, t in whole.state_dict().items() if not torch.equal(t, resumed.state_dict()[n])]
    assert differs, "a plain DataLoader resumed exactly: the test cannot tell a stateful loader from none"


@pytest.mark.slow
def test_the_preempted_fit_skips_its_fit_end_work_and_restores_the_signal_handler(
    quiet_trainer_kwargs: dict[str, Any], tmp_path: Path
) -> None:
    before = signal.getsignal(signal.SIGUSR1)
    qat = QuantizationAwareTraining(weight_bits=8, activation_bits=8, start_step=5)
    preemption = PreemptionCheckpoint()
    model = fit(quiet_trainer_kwargs, [qat, preemption, SignalAt(8)], MAX_STEPS)
    assert preemption.saved is not None and signal.getsignal(signal.SIGUSR1) is before
    assert not any(type(m).__name__.startswith("Int8") for m in model.modules()), "converted to int8 at preemption"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hpc_ckpt_1.ckpt", "preemption.json"]


@pytest.mark.slow
def test_each_preemption_leaves_one_checkpoint_and_deletes_the_older_ones(
    quiet_trainer_kwargs: dict[str, Any], tmp_path: Path
) -> None:
    for number, step in enumerate((6, 12, 18), start=1):
        trainer = pl.Trainer(
            max_steps=MAX_STEPS, callbacks=[PreemptionCheckpoint(keep=2), SignalAt(step)], **quiet_trainer_kwargs
        )
        pl.seed_everything(0)
        trainer.fit(ImageClassifier(image_size=8), DigitsDataModule(), ckpt_path="hpc" if number > 1 else None)
        assert trainer.global_step == step + 1
    names = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("hpc_ckpt_"))
    assert names == ["hpc_ckpt_2.ckpt", "hpc_ckpt_3.ckpt"]
    manifest = json.loads((tmp_path / "preemption.json").read_text())
    assert {name: entry["step"] for name, entry in manifest["checkpoints"].items()} == {
        "hpc_ckpt_2.ckpt": 13,
        "hpc_ckpt_3.ckpt": 19,
    }


@pytest.fixture
def slurm_job(monkeypatch: pytest.MonkeyPatch) -> None:
    """The environment of a one-task SLURM batch job (Lightning then resumes from ``hpc_ckpt_*`` by itself)."""
    for name in [n for n in os.environ if n.startswith("SLURM_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("SLURM_JOB_ID", "41")
    monkeypatch.setenv("SLURM_NTASKS", "1")
    monkeypatch.setenv("SLURM_JOB_NAME", "lightning-compress")


def preempted_slurm_fit(quiet: dict[str, Any]) -> Path:
    preemption = PreemptionCheckpoint(requeue=False)
    fit(quiet, [preemption, SignalAt(4)], MAX_STEPS)
    assert preemption.saved is not None
    return preemption.saved


@pytest.mark.slow
@pytest.mark.usefixtures("slurm_job")
def test_a_slurm_job_resumes_from_its_own_checkpoint_without_a_ckpt_path(
    quiet_trainer_kwargs: dict[str, Any],
) -> None:
    preempted_slurm_fit(quiet_trainer_kwargs)
    trainer = pl.Trainer(max_steps=8, callbacks=[PreemptionCheckpoint(requeue=False)], **quiet_trainer_kwargs)
    trainer.fit(ImageClassifier(image_size=8), DigitsDataModule())
    assert trainer.ckpt_path is not None and Path(trainer.ckpt_path).name == "hpc_ckpt_1.ckpt"
    assert trainer.global_step == 8


@pytest.mark.slow
@pytest.mark.usefixtures("slurm_job")
def test_a_damaged_checkpoint_is_refused_by_name_before_it_is_loaded(quiet_trainer_kwargs: dict[str, Any]) -> None:
    saved = preempted_slurm_fit(quiet_trainer_kwargs)
    data = bytearray(saved.read_bytes())
    data[len(data) // 2] ^= 0xFF
    saved.write_bytes(bytes(data))
    trainer = pl.Trainer(max_steps=8, callbacks=[PreemptionCheckpoint(requeue=False)], **quiet_trainer_kwargs)
    with pytest.raises(CheckpointRefused, match=r"hpc_ckpt_1\.ckpt \(step 5\) does not match.*start over silently"):
        trainer.fit(ImageClassifier(image_size=8), DigitsDataModule())
    assert saved.exists(), "the refused checkpoint was deleted"


@pytest.mark.slow
@pytest.mark.usefixtures("slurm_job")
def test_another_jobs_checkpoint_in_the_same_folder_is_refused(
    quiet_trainer_kwargs: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    preempted_slurm_fit(quiet_trainer_kwargs)
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    trainer = pl.Trainer(max_steps=8, callbacks=[PreemptionCheckpoint(requeue=False)], **quiet_trainer_kwargs)
    with pytest.raises(CheckpointRefused, match=r"written by SLURM job 41, not by this job \(42\).*default_root_dir"):
        trainer.fit(ImageClassifier(image_size=8), DigitsDataModule())


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"signal": "SIGKILL"}, r"`signal` must be one of .*SIGUSR1.*got 'SIGKILL'"),
        ({"signal": "SIGTERM"}, r"got 'SIGTERM'.*SIGTERM and SIGINT are Lightning's own"),
        ({"signal": 10}, r"`signal` must be a signal name"),
        ({"keep": 0}, r"`keep` must be an integer >= 1; got 0"),
        ({"requeue": "yes"}, r"`requeue` must be"),
    ],
)
def test_bad_arguments_are_refused_at_construction(arguments: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PreemptionCheckpoint(**arguments)


def test_signal_names_are_accepted_with_or_without_the_prefix() -> None:
    assert PreemptionCheckpoint(signal="usr2").signal == "SIGUSR2"
    assert PreemptionCheckpoint(signal="SIGUSR1").signal == "SIGUSR1"
