"""The timed models and batches of the speed benchmarks (int8_speed, lowrank_speed), how two outputs compare, forward
hooks on named layers for a while, and the names of MiniLM's encoder Linears (lowrank_accuracy, lowrank_truncation).

- ``mlp``: 4 x Linear(1024, 1024) with ReLU between them, batch 64 of random normal inputs;
- ``cnn``: ``ReferenceCNN``, batch 256 of Fashion-MNIST t10k images (random images when it is not installed);
- ``minilm``: the whole ``MiniLMClassifier`` (pretrained all-MiniLM-L6-v2 encoder), 16 Rotten Tomatoes snippets
  tokenised to 64 tokens (random token ids when the corpus is not installed).

Weights are the float initialisation (pretrained for the MiniLM encoder): speed does not depend on training. Each
model comes with its timed batch, a few more batches for calibration, and labels for training steps.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lightning_compress.data import MissingDataError


@dataclass
class Bench:
    """One model with its timed batch, calibration batches and training labels."""

    name: str
    description: str
    model: nn.Module
    inputs: tuple[torch.Tensor, ...]
    calibration: list[tuple[torch.Tensor, ...]]
    labels: torch.Tensor
    data: str
    notes: list[str] = field(default_factory=list)


def mlp_bench() -> Bench:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for i in range(4):
        layers.append(nn.Linear(1024, 1024))
        if i < 3:
            layers.append(nn.ReLU())
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(64, 1024, generator=gen),) for _ in range(9)]
    labels = torch.randint(0, 1024, (64,), generator=gen)
    return Bench("mlp", "4 x Linear(1024) + ReLU, batch 64", nn.Sequential(*layers).eval(), batches[0],
                 batches[1:], labels, "random normal inputs")  # fmt: skip


def cnn_bench() -> Bench:
    from lightning_compress.data import FashionMNISTDataModule
    from lightning_compress.models import ReferenceCNN

    torch.manual_seed(0)
    model = ReferenceCNN().eval()
    batch, n_batches = 256, 5
    try:
        data = FashionMNISTDataModule(batch_size=batch)
        data.setup("test")
        test = data.test_set
        images = torch.stack([test[i][0] for i in range(batch * n_batches)])
        labels = torch.stack([test[i][1] for i in range(batch)])
        source = "Fashion-MNIST t10k images"
    except MissingDataError:
        gen = torch.Generator().manual_seed(1)
        images = torch.randn(batch * n_batches, 1, 28, 28, generator=gen)
        labels = torch.randint(0, 10, (batch,), generator=gen)
        source = "random images (Fashion-MNIST not installed)"
    chunks = [(c,) for c in images.split(batch)]
    return Bench("cnn", "ReferenceCNN, batch 256 x 1x28x28", model, chunks[0], chunks[1:], labels, source)


def minilm_bench() -> Bench:
    from lightning_compress.models import MiniLMClassifier, minilm_path

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = MiniLMClassifier().eval()
    batch, tokens, n_batches = 16, 64, 5
    try:
        from transformers import AutoTokenizer

        from lightning_compress.data.rotten_tomatoes import corpus_path, read_corpus

        texts, all_labels = read_corpus(corpus_path())
        tokenizer = AutoTokenizer.from_pretrained(str(minilm_path()), local_files_only=True)
        enc = tokenizer(texts[: batch * n_batches], padding="max_length", truncation=True, max_length=tokens,
                        return_tensors="pt")  # fmt: skip
        ids, mask = enc["input_ids"], enc["attention_mask"]
        labels = torch.from_numpy(all_labels[:batch])
        source = f"Rotten Tomatoes snippets (first {batch * n_batches}), padded/truncated to {tokens} tokens"
    except MissingDataError:
        gen = torch.Generator().manual_seed(1)
        ids = torch.randint(1000, 30000, (batch * n_batches, tokens), generator=gen)
        mask = torch.ones_like(ids)
        labels = torch.randint(0, 2, (batch,), generator=gen)
        source = "random token ids (Rotten Tomatoes corpus not installed)"
    chunks = list(zip(ids.split(batch), mask.split(batch), strict=True))
    real_tokens = float(chunks[0][1].float().mean())
    bench = Bench("minilm", f"MiniLMClassifier (whole model), {batch} x {tokens} tokens", model, chunks[0],
                  chunks[1:], labels, source)  # fmt: skip
    bench.notes.append(f"{real_tokens:.0%} of the timed batch's positions are real tokens (the rest padding)")
    return bench


#: The six Linear layers of every MiniLM encoder block, as their qualified names end.
ENCODER_LINEAR_KINDS = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
                        "intermediate.dense", "output.dense")  # fmt: skip
BUILDERS: dict[str, Callable[[], Bench]] = {"mlp": mlp_bench, "cnn": cnn_bench, "minilm": minilm_bench}
MODELS = tuple(BUILDERS)


def agreement(ref: torch.Tensor, other: torch.Tensor) -> dict[str, float]:
    """How far ``other`` is from ``ref``: max abs difference (and ref's max abs), relative L2, argmax agreement."""
    ref, other = ref.float(), other.float()
    return {
        "max_abs_diff": float((ref - other).abs().max()),
        "ref_max_abs": float(ref.abs().max()),
        "rel_l2": float((ref - other).norm() / ref.norm().clamp(min=1e-12)),
        "argmax_agreement": float((ref.argmax(-1) == other.argmax(-1)).float().mean()),
    }


@contextmanager
def forward_hooks(
    layers: dict[str, nn.Module],
    before: Callable[[str], object] | None = None,
    after: Callable[[str, tuple[Any, ...], Any], object] | None = None,
) -> Iterator[None]:
    """While inside: ``before(name)`` runs ahead of every forward of ``layers[name]``, ``after(name, inputs, output)``
    behind it; the hooks are removed on the way out."""
    handles = []
    for name, module in layers.items():
        if before is not None:
            handles.append(module.register_forward_pre_hook(lambda m, i, n=name: before(n)))
        if after is not None:
            handles.append(module.register_forward_hook(lambda m, i, o, n=name: after(n, i, o)))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
