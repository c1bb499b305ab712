"""What the bundled DataModules share: seeded shuffling, a training loader that resumes mid-epoch, quiet workers, and
the checks of their loader arguments.

The training loader is torchdata's ``StatefulDataLoader`` (a ``DataLoader`` with ``state_dict``/``load_state_dict``).
Lightning saves its position in every checkpoint and restores it, so a run resumed from a checkpoint written
mid-epoch (a preemption, ``ModelCheckpoint(every_n_train_steps=...)``) sees exactly the batches the epoch had left;
with a plain ``DataLoader`` it would see the epoch's first batches again and never its last ones.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sized
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler
from torchdata.stateful_dataloader import StatefulDataLoader

from lightning_compress import arguments
from lightning_compress._lightning import LightningDataModule, injects_distributed_sampler


def check_loader_arguments(batch_size: int, seed: int, num_workers: int, limit_train: int | None = None) -> None:
    """Refuse the loader arguments every bundled DataModule takes, before any file is read."""
    arguments.integer("batch_size", batch_size, minimum=1, hint="examples per batch.")
    arguments.integer("seed", seed, minimum=0, hint="the seed of the splits and of the training shuffle.")
    arguments.integer("num_workers", num_workers, minimum=0, hint="0 loads batches in the main process.")
    arguments.integer("limit_train", limit_train, minimum=1, allow_none=True, hint="None trains on the whole split.")


class ResumableOrder:
    """What makes a sampler resume inside an epoch: its ``state_dict`` is the epoch and how many indices of this
    epoch's order it has given out, and the next ``__iter__`` after ``load_state_dict`` continues from there.

    The state travels in the training loader's state (``StatefulDataLoader`` saves a sampler that has one). It also
    carries the epoch because ``StatefulDataLoader`` restores a loader before Lightning calls ``set_epoch`` on a
    resume. A state saved after the epoch's last batch is ignored: Lightning counts that epoch as done and starts the
    next one from its start.
    """

    epoch: int
    yielded: int = 0
    _resume_at: int = 0

    def _continue(self, order: list[int]) -> Iterator[int]:
        start, self._resume_at = self._resume_at, 0
        self.yielded = start
        for index in order[start:]:
            self.yielded += 1
            yield index

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "yielded": self.yielded}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        if state_dict["yielded"] >= len(self):  # type: ignore[arg-type]
            return
        self.epoch = state_dict["epoch"]
        self._resume_at = state_dict["yielded"]


class EpochSeededRandomSampler(ResumableOrder, RandomSampler):
    """A shuffle that is a function of (seed, epoch) alone, resumable inside an epoch (:class:`ResumableOrder`).

    Lightning calls ``set_epoch`` at every epoch start, also after resuming from a checkpoint, so a resumed run
    draws the same order as one never stopped (a generator seeded once per DataLoader would restart at epoch 0's
    order).
    """

    def __init__(self, data_source: Sized, seed: int) -> None:
        super().__init__(data_source)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        yield from self._continue(torch.randperm(len(self.data_source), generator=generator).tolist())


class ResumableDistributedSampler(ResumableOrder, DistributedSampler):
    """The ``DistributedSampler`` Lightning would put in place of a shuffling sampler under DDP or DeepSpeed (same
    arguments, so the same order), resumable inside an epoch (:class:`ResumableOrder`)."""

    def __iter__(self) -> Iterator[int]:
        yield from self._continue(list(super().__iter__()))


def distributed_sampler_kwargs(trainer: Any) -> dict[str, Any] | None:
    """The arguments of the ``DistributedSampler`` Lightning would inject for ``trainer``; None where it would not
    (one process, or ``Trainer(use_distributed_sampler=False)``)."""
    if trainer is None or not injects_distributed_sampler(trainer):
        return None
    kwargs = dict(trainer.distributed_sampler_kwargs or {})
    kwargs.setdefault("seed", int(os.environ.get("PL_GLOBAL_SEED", 0)))
    return kwargs


def make_loader(
    dataset: Dataset | None,
    batch_size: int,
    num_workers: int,
    shuffle_seed: int | None = None,
    distributed: dict[str, Any] | None = None,
) -> DataLoader:
    """A DataLoader over ``dataset``. With ``shuffle_seed`` (the training loader): shuffled by (seed, epoch), or by
    a :class:`ResumableDistributedSampler` built from ``distributed``, and stateful."""
    if dataset is None:
        raise RuntimeError("The DataModule has no data for this stage yet: call `setup(stage)` first.")
    if shuffle_seed is None:
        loader, sampler = DataLoader, None
    elif distributed is None:
        loader, sampler = StatefulDataLoader, EpochSeededRandomSampler(dataset, shuffle_seed)
    else:
        loader, sampler = StatefulDataLoader, ResumableDistributedSampler(dataset, shuffle=True, **distributed)
    return loader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
    )


class SplitDataModule(LightningDataModule):
    """A DataModule whose ``setup`` fills ``train_set``, ``val_set`` and ``test_set``; the loaders are shared."""

    batch_size: int
    num_workers: int
    seed: int
    train_set: Dataset | None = None
    val_set: Dataset | None = None
    test_set: Dataset | None = None

    def train_dataloader(self) -> DataLoader:
        distributed = distributed_sampler_kwargs(getattr(self, "trainer", None))
        return make_loader(self.train_set, self.batch_size, self.num_workers, self.seed, distributed)

    def val_dataloader(self) -> DataLoader:
        return make_loader(self.val_set, self.batch_size, self.num_workers)

    def test_dataloader(self) -> DataLoader:
        return make_loader(self.test_set, self.batch_size, self.num_workers)

    def predict_dataloader(self) -> DataLoader:
        return make_loader(self.test_set, self.batch_size, self.num_workers)
