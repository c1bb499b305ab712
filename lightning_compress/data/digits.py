"""scikit-learn's 8x8 handwritten digits (1,797 images, bundled with scikit-learn: no download)."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import TensorDataset

from lightning_compress import arguments
from lightning_compress.data._loaders import SplitDataModule, check_loader_arguments


class DigitsDataModule(SplitDataModule):
    """Digits as float tensors ``(N, 1, 8, 8)``, normalised, with seeded test/val/train splits.

    Sizes with the defaults: 1,797 images -> test 359, val 270, train 1,168.
    """

    in_channels = 1
    image_size = 8
    num_classes = 10
    total_size = 1797
    mean = 0.3053  # of pixel / 16 over all 1,797 images
    std = 0.3760

    def __init__(
        self,
        batch_size: int = 64,
        val_fraction: float = 0.15,
        test_fraction: float = 0.2,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        check_loader_arguments(batch_size, seed, num_workers)
        for name, fraction in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            arguments.fraction(name, fraction, low_open=True, high_open=True, hint="a share of the 1,797 images.")
        if val_fraction + test_fraction >= 1:
            raise ValueError(
                f"`val_fraction` + `test_fraction` must be < 1 to leave training data, got {val_fraction!r} + "
                f"{test_fraction!r} = {val_fraction + test_fraction!r}. HINT: the defaults 0.15 + 0.2 train on 65 %."
            )
        self.save_hyperparameters()
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.seed = seed
        self.num_workers = num_workers
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None
        self.test_set: TensorDataset | None = None

    def split_indices(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(train, val, test) indices into the 1,797 images; a function of the seed and fractions alone."""
        order = np.random.default_rng(self.seed).permutation(self.total_size)
        n_test = round(self.total_size * self.test_fraction)
        n_val = round(self.total_size * self.val_fraction)
        return order[n_test + n_val :], order[n_test : n_test + n_val], order[:n_test]

    def setup(self, stage: str | None = None) -> None:
        """Load and split all of it once (it is tiny); later calls do nothing."""
        if self.train_set is not None:
            return
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = torch.from_numpy(digits.data).float().div_(16.0).sub_(self.mean).div_(self.std).view(-1, 1, 8, 8)
        labels = torch.from_numpy(digits.target).long()
        train, val, test = (torch.from_numpy(i) for i in self.split_indices())
        self.train_set = TensorDataset(images[train], labels[train])
        self.val_set = TensorDataset(images[val], labels[val])
        self.test_set = TensorDataset(images[test], labels[test])
