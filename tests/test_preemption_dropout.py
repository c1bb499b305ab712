"""A preempted fit of a model with dropout (transformers' GPT-2, every step draws from the global RNG) resumes
bitwise equal to one never stopped, also when the preemption checkpoint follows an epoch's last batch.

Creating a DataLoader iterator draws one number from the global torch RNG (its base seed). At an epoch's end the run
never stopped creates the next epoch's iterator *after* the checkpoint; the resumed run creates it in Lightning's
``setup_data``, before ``on_train_start``. PreemptionCheckpoint once restored the random states there, after that
draw, so the resumed run lost it and every later dropout mask shifted. Mid-epoch checkpoints, and models without
dropout (the digits CNN of test_preemption.py), never showed it; no compression callback is needed to see it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from families import FAMILIES, QUIET
from signal_at import SignalAt
from torchdata.stateful_dataloader import StatefulDataLoader

from lightning_compress import PreemptionCheckpoint
from lightning_compress._lightning import pl
from lightning_compress.data._loaders import EpochSeededRandomSampler

MAX_STEPS = 8  # 4 batches an epoch: two epochs


def loader(kind: str) -> StatefulDataLoader:
    dataset = FAMILIES["gpt2"].dataset()
    if kind == "epoch_seeded":  # the bundled DataModules' resumable shuffle
        return StatefulDataLoader(dataset, batch_size=8, sampler=EpochSeededRandomSampler(dataset, 0))
    return StatefulDataLoader(dataset, batch_size=8, shuffle=False)  # resumes into its finished epoch (empty)


def fit(root: Path, kind: str, signal_step: int | None = None, resume: bool = False) -> tuple[torch.nn.Module, int]:
    pl.seed_everything(1 if resume else 0, verbose=False)  # the resume must not depend on the new process's RNG
    torch.manual_seed(0)
    module = FAMILIES["gpt2"].module()
    preemption = PreemptionCheckpoint(requeue=False)
    callbacks = [preemption] + ([SignalAt(signal_step)] if signal_step is not None else [])
    trainer = pl.Trainer(max_steps=MAX_STEPS, callbacks=callbacks, default_root_dir=root, **QUIET)
    trainer.fit(module, loader(kind), ckpt_path="hpc" if resume else None)
    if signal_step is not None:
        assert preemption.saved is not None, "the fit was not preempted"
    return module, trainer.global_step


@pytest.mark.parametrize(
    ("kind", "signal_step"),
    [
        ("epoch_seeded", 3),  # checkpoint at step 4: right after epoch 0's last batch (failed before the fix)
        ("epoch_seeded", 5),  # mid-epoch
        ("sequential", 3),  # epoch end, with a loader that resumes into an empty epoch first
    ],
)
def test_a_preempted_fit_with_dropout_resumes_bitwise(tmp_path: Path, kind: str, signal_step: int) -> None:
    whole, _ = fit(tmp_path / "whole", kind)
    fit(tmp_path / "run", kind, signal_step=signal_step)
    resumed, steps = fit(tmp_path / "run", kind, resume=True)
    assert steps == MAX_STEPS
    expected = whole.state_dict()
    differing = [k for k, v in resumed.state_dict().items() if not torch.equal(v, expected[k])]
    assert not differing, f"{len(differing)} of {len(expected)} tensors differ, e.g. {differing[:3]}"
