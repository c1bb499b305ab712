"""Fashion-MNIST (60k train / 10k test, 28x28) from the files of the Debian package ``dataset-fashion-mnist``."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from lightning_compress import arguments
from lightning_compress._installed import MissingDataError
from lightning_compress.data._loaders import SplitDataModule, check_loader_arguments

DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
ENV_VAR = "LIGHTNING_COMPRESS_FASHION_MNIST_DIR"
FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}


def read_idx(path: str | Path, ndim: int) -> np.ndarray:
    """Read a gzipped idx file of unsigned bytes with ``ndim`` dimensions; checks magic number and size."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    header = 4 + 4 * ndim
    if len(raw) < header or raw[:2] != b"\x00\x00" or raw[2] != 0x08 or raw[3] != ndim:
        raise ValueError(
            f"{path} is not an idx file of unsigned bytes with {ndim} dimension(s) (magic {raw[:4].hex()})."
        )
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    data = np.frombuffer(raw, dtype=np.uint8, offset=header)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says shape {shape} but holds {data.size} bytes of data.")
    return data.reshape(shape)


class _NormalisedImages(Dataset):
    """uint8 images ``(N, H, W)`` kept small in memory, served as normalised float ``(1, H, W)``."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean: float, std: float) -> None:
        self.images, self.labels, self.mean, self.std = images, labels, mean, std

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.images[i].unsqueeze(0).float().div_(255.0).sub_(self.mean).div_(self.std)
        return x, self.labels[i]


class FashionMNISTDataModule(SplitDataModule):
    """Fashion-MNIST as float tensors ``(N, 1, 28, 28)``; val = a seeded ``val_size`` of the 60k train, test = t10k.

    The folder is ``data_dir``, else ``$LIGHTNING_COMPRESS_FASHION_MNIST_DIR``, else
    ``/usr/share/datasets/fashion-mnist`` (where Debian's ``dataset-fashion-mnist`` puts it).
    """

    in_channels = 1
    image_size = 28
    num_classes = 10
    mean = 0.2860
    std = 0.3530

    def __init__(
        self,
        data_dir: str | None = None,
        batch_size: int = 128,
        val_size: int = 5000,
        seed: int = 0,
        num_workers: int = 0,
        limit_train: int | None = None,
    ) -> None:
        super().__init__()
        check_loader_arguments(batch_size, seed, num_workers, limit_train)
        arguments.integer("val_size", val_size, minimum=0, hint="images held out of the 60,000 for validation.")
        if val_size >= 60000:
            raise ValueError(
                f"`val_size` must be < 60000 (the size of the training set), got {val_size!r}. HINT: the default"
                " 5000 leaves 55,000 images to train on."
            )
        self.save_hyperparameters()
        self.data_dir = Path(data_dir or os.environ.get(ENV_VAR) or DEFAULT_DIR)
        self.batch_size, self.val_size, self.seed = batch_size, val_size, seed
        self.num_workers, self.limit_train = num_workers, limit_train
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None
        self._check_files()

    def _check_files(self) -> None:
        missing = [name for name in FILES.values() if not (self.data_dir / name).is_file()]
        if missing:
            raise MissingDataError(
                f"Fashion-MNIST files {missing} are missing from {str(self.data_dir)!r}. Install them with "
                f"`sudo apt-get install dataset-fashion-mnist` (into {DEFAULT_DIR}), or pass `data_dir` "
                f"(or set ${ENV_VAR}) to a folder holding {sorted(FILES.values())}."
            )

    def _load(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        images = read_idx(self.data_dir / FILES[f"{split}_images"], ndim=3)
        labels = read_idx(self.data_dir / FILES[f"{split}_labels"], ndim=1)
        if len(images) != len(labels):
            raise ValueError(f"Fashion-MNIST {split}: {len(images)} images but {len(labels)} labels.")
        return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))

    def split_indices(self, n_train: int = 60000) -> tuple[np.ndarray, np.ndarray]:
        """(train, val) indices into the 60k training images; train is cut to ``limit_train`` if set."""
        order = np.random.default_rng(self.seed).permutation(n_train)
        train = order[self.val_size :]
        return (train if self.limit_train is None else train[: self.limit_train]), order[: self.val_size]

    def setup(self, stage: str | None = None) -> None:
        """Load what ``stage`` needs (fit/validate: train+val; test/predict: test); repeated calls do nothing."""
        if stage in (None, "fit", "validate") and self.train_set is None:
            images, labels = self._load("train")
            train, val = (torch.from_numpy(i) for i in self.split_indices(len(labels)))
            self.train_set = _NormalisedImages(images[train], labels[train], self.mean, self.std)
            self.val_set = _NormalisedImages(images[val], labels[val], self.mean, self.std)
        if stage in (None, "test", "predict") and self.test_set is None:
            self.test_set = _NormalisedImages(*self._load("test"), self.mean, self.std)
