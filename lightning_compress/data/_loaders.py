"""What the bundled DataModules share: seeded shuffling, quiet workers, and the checks of their loader arguments."""

from __future__ import annotations

from collections.abc import Iterator, Sized

import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler

from lightning_compress import arguments
from lightning_compress._lightning import LightningDataModule


def check_loader_arguments(batch_size: int, seed: int, num_workers: int, limit_train: int | None = None) -> None:
    """Refuse the loader arguments every bundled DataModule takes, before any file is read."""
    arguments.integer("batch_size", batch_size, minimum=1, hint="examples per batch.")
    arguments.integer("seed", seed, minimum=0, hint="the seed of the splits and of the training shuffle.")
    arguments.integer("num_workers", num_workers, minimum=0, hint="0 loads batches in the main process.")
    arguments.integer("limit_train", limit_train, minimum=1, allow_none=True, hint="None trains on the whole split.")


class EpochSeededRandomSampler(RandomSampler):
    """A shuffle that is a function of (seed, epoch) alone.

    Lightning calls ``set_epoch`` at every epoch start, also after resuming from a checkpoint, so a resumed run
    draws the same order as one never stopped (a generator seeded once per DataLoader would restart at epoch 0's
    order). Being a ``RandomSampler``, Lightning swaps it for a ``DistributedSampler`` under DDP, as for
    ``shuffle=True``.
    """

    def __init__(self, data_source: Sized, seed: int) -> None:
        super().__init__(data_source)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        yield from torch.randperm(len(self.data_source), generator=generator).tolist()


def make_loader(
    dataset: Dataset | None, batch_size: int, num_workers: int, shuffle_seed: int | None = None
) -> DataLoader:
    """A DataLoader over ``dataset``; shuffled by (``shuffle_seed``, epoch) when a seed is given."""
    if dataset is None:
        raise RuntimeError("The DataModule has no data for this stage yet: call `setup(stage)` first.")
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=None if shuffle_seed is None else EpochSeededRandomSampler(dataset, shuffle_seed),
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
        return make_loader(self.train_set, self.batch_size, self.num_workers, shuffle_seed=self.seed)

    def val_dataloader(self) -> DataLoader:
        return make_loader(self.val_set, self.batch_size, self.num_workers)

    def test_dataloader(self) -> DataLoader:
        return make_loader(self.test_set, self.batch_size, self.num_workers)

    def predict_dataloader(self) -> DataLoader:
        return make_loader(self.test_set, self.batch_size, self.num_workers)
