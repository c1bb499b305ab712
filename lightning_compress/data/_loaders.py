"""DataLoader construction shared by the bundled DataModules: seeded shuffling, quiet workers."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset

from lightning_compress._lightning import LightningDataModule


def make_loader(
    dataset: Dataset | None, batch_size: int, num_workers: int, shuffle_seed: int | None = None
) -> DataLoader:
    """A DataLoader over ``dataset``; shuffled with a generator seeded by ``shuffle_seed`` when it is given."""
    if dataset is None:
        raise RuntimeError("The DataModule has no data for this stage yet: call `setup(stage)` first.")
    generator = None if shuffle_seed is None else torch.Generator().manual_seed(shuffle_seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle_seed is not None,
        generator=generator,
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
