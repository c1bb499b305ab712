"""Tiny transformers models of the families people fine-tune, as Lightning modules, for the acceptance of issue 12.

Each family is a tiny config with seeded random init (no network, nothing downloaded, built in milliseconds, hidden
sizes of 32-64 so that low-rank and 2:4 pruning have something to do), the transformers model class that runs it,
and a seeded synthetic sample of the right shape. :data:`FAMILIES` maps a name to its :class:`Family`, so tests
parametrize over it::

    module = FAMILIES["gpt2"].module()            # a FamilyModule: training_step = self.model(**batch).loss
    trainer = pl.Trainer(max_steps=8, **QUIET)
    trainer.fit(module, FAMILIES["gpt2"].loader())
    logits = eval_logits(module, FAMILIES["gpt2"].eval_batch())

:class:`FamilyModule` calls ``save_hyperparameters()`` with its family's name, so ``load_compressed`` can rebuild it
without a skeleton (``trusted_prefixes=[FamilyModule.__module__]``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MobileNetV2Config,
    MobileNetV2ForImageClassification,
    PretrainedConfig,
    PreTrainedModel,
    ResNetConfig,
    ResNetForImageClassification,
    T5Config,
    T5ForConditionalGeneration,
    ViTConfig,
    ViTForImageClassification,
)
from transformers.pytorch_utils import Conv1D

from lightning_compress._lightning import pl

SEED = 0
VOCAB = 96
SEQUENCE = 16
LABELS = 4
BATCH = 8
SAMPLES = 32  # 4 batches an epoch: a fit of a few steps crosses epochs, as real ones do

#: The layer types whose weights the acceptance counts (transformers' Conv1D has weight ``(in, out)``).
LAYER_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, Conv1D)

#: Quiet, CPU-only Trainer settings; add ``max_steps`` and the callbacks.
QUIET: dict[str, Any] = {
    "accelerator": "cpu",
    "devices": 1,
    "num_sanity_val_steps": 0,
    **dict.fromkeys(("logger", "enable_checkpointing", "enable_progress_bar", "enable_model_summary"), False),
}
#: The sizes BERT, Llama and ViT name alike: two layers of width 32 with a 64-wide feed-forward.
SIZES: dict[str, int] = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}

Sample = Callable[[torch.Generator], dict[str, torch.Tensor]]


def _tokens(generator: torch.Generator) -> torch.Tensor:
    return torch.randint(1, VOCAB, (SEQUENCE,), generator=generator)  # 0 is T5's pad / decoder start


def _classified_text(generator: torch.Generator) -> dict[str, torch.Tensor]:
    ids = _tokens(generator)
    label = torch.randint(0, LABELS, (), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": label}


def _causal_text(generator: torch.Generator) -> dict[str, torch.Tensor]:
    ids = _tokens(generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def _seq2seq_text(generator: torch.Generator) -> dict[str, torch.Tensor]:
    ids = _tokens(generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": _tokens(generator)}


def _images(size: int) -> Sample:
    def sample(generator: torch.Generator) -> dict[str, torch.Tensor]:
        pixels = torch.randn(3, size, size, generator=generator)
        return {"pixel_values": pixels, "labels": torch.randint(0, LABELS, (), generator=generator)}

    return sample


@dataclass(frozen=True)
class Family:
    """One model family: how to build its tiny model, and what its batches look like."""

    name: str
    config: Callable[[], PretrainedConfig]
    model_class: type[PreTrainedModel]
    sample: Sample
    feed_forward: str  # regex of the feed-forward layers' qualified names in a FamilyModule (the composed run's split)

    def build_model(self) -> PreTrainedModel:
        """The transformers model with seeded random init: the same weights on every call."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(SEED)
            return self.model_class(self.config())

    def module(self, learning_rate: float = 1e-3) -> FamilyModule:
        return FamilyModule(self.name, learning_rate=learning_rate)

    def dataset(self, samples: int = SAMPLES, seed: int = SEED) -> SyntheticDataset:
        return SyntheticDataset(self.sample, samples, seed)

    def loader(self, samples: int = SAMPLES, batch_size: int = BATCH) -> DataLoader:
        return DataLoader(self.dataset(samples), batch_size=batch_size, shuffle=False)

    def eval_batch(self, batch_size: int = 4 * BATCH) -> dict[str, torch.Tensor]:
        """A fixed batch that no fit trains on (its own seed), for comparing outputs."""
        return next(iter(DataLoader(self.dataset(batch_size, seed=SEED + 1), batch_size=batch_size)))


class SyntheticDataset(Dataset):
    """``samples`` seeded samples, drawn once: the same data for every fit."""

    def __init__(self, sample: Sample, samples: int, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.items = [sample(generator) for _ in range(samples)]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.items[index]


class FamilyModule(pl.LightningModule):
    """A family's transformers model as a user would wrap it: ``training_step`` returns ``self.model(**batch).loss``."""

    def __init__(self, family: str, learning_rate: float = 1e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = FAMILIES[family].build_model()
        self.learning_rate = learning_rate

    def forward(self, **batch: torch.Tensor) -> Any:
        return self.model(**batch)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.model(**batch).loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.learning_rate)


FAMILIES: dict[str, Family] = {
    family.name: family
    for family in (
        Family(
            "bert",
            lambda: BertConfig(
                vocab_size=VOCAB,
                **SIZES,
                max_position_embeddings=2 * SEQUENCE,
                num_labels=LABELS,
            ),
            BertForSequenceClassification,
            _classified_text,
            r".*\.(intermediate|layer\.\d+\.output)\.dense",
        ),
        Family(
            "gpt2",
            lambda: GPT2Config(
                vocab_size=VOCAB,
                n_embd=32,
                n_layer=2,
                n_head=2,
                n_positions=2 * SEQUENCE,
                bos_token_id=VOCAB - 1,
                eos_token_id=VOCAB - 1,
            ),
            GPT2LMHeadModel,
            _causal_text,
            r".*\.mlp\.c_(fc|proj)",
        ),
        Family(
            "llama",
            lambda: LlamaConfig(
                vocab_size=VOCAB,
                **SIZES,
                num_key_value_heads=2,
                max_position_embeddings=2 * SEQUENCE,
            ),
            LlamaForCausalLM,
            _causal_text,
            r".*\.mlp\.(gate|up|down)_proj",
        ),
        Family(
            "t5",
            lambda: T5Config(
                vocab_size=VOCAB,
                d_model=32,
                d_kv=16,
                d_ff=64,
                num_layers=2,
                num_decoder_layers=2,
                num_heads=2,
                pad_token_id=0,
                decoder_start_token_id=0,
            ),
            T5ForConditionalGeneration,
            _seq2seq_text,
            r".*\.DenseReluDense\.w[io]",
        ),
        Family(
            "vit",
            lambda: ViTConfig(
                image_size=16,
                patch_size=4,
                num_channels=3,
                **SIZES,
                num_labels=LABELS,
            ),
            ViTForImageClassification,
            _images(16),
            r".*\.mlp\.fc[12]",
        ),
        Family(
            "resnet",
            lambda: ResNetConfig(
                num_channels=3,
                embedding_size=16,
                hidden_sizes=[32, 64],
                depths=[1, 1],
                layer_type="basic",
                num_labels=LABELS,
            ),
            ResNetForImageClassification,
            _images(32),
            r".*\.stages\.1\.layers\.0\.layer\.[01]\.convolution",
        ),
        Family(
            "mobilenet_v2",
            lambda: MobileNetV2Config(
                num_channels=3, image_size=16, depth_multiplier=0.25, finegrained_output=False, num_labels=LABELS
            ),  # the architecture's 17 blocks are fixed; 0.25 keeps its widths at 8-80 (320 at the end)
            MobileNetV2ForImageClassification,
            _images(16),
            r".*\.expand_1x1\.convolution",
        ),
    )
}


def fit(module: pl.LightningModule, family: Family, callbacks: list[Any], max_steps: int) -> pl.Trainer:
    """Fit ``module`` on ``family``'s synthetic data for ``max_steps`` with ``callbacks``, quietly and seeded; the
    module comes back detached from the Trainer, as a user holds it for inference, copying and export."""
    pl.seed_everything(SEED, verbose=False)
    trainer = pl.Trainer(max_steps=max_steps, callbacks=callbacks, **QUIET)
    try:
        trainer.fit(module, family.loader())
    finally:
        module.trainer = None
    return trainer


def eval_logits(module: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's logits on ``batch`` in eval mode (the module is left in eval mode)."""
    module.eval()
    with torch.no_grad():
        return module(**batch).logits


def embedding_weights(model: nn.Module) -> list[torch.Tensor]:
    """The weights of ``nn.Embedding`` modules (a Linear whose weight is one of these is tied to an embedding)."""
    return [module.weight for module in model.modules() if isinstance(module, nn.Embedding)]


def layer_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's Linear/Conv/Conv1D weights outside embeddings, by module name: every module of
    :data:`LAYER_TYPES` whose weight is not (tied to) an ``nn.Embedding``'s, e.g. GPT-2's and T5's ``lm_head``."""
    embedded = embedding_weights(model)
    return {
        name: module.weight
        for name, module in model.named_modules()
        if isinstance(module, LAYER_TYPES) and not any(_same_storage(module.weight, e) for e in embedded)
    }


def parameter_count(model: nn.Module) -> int:
    """Elements of the model's distinct parameters (a tied weight counted once)."""
    return sum(p.numel() for p in model.parameters())


def state_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The model's state dict as (name, tensor) pairs, detached and on the CPU."""
    for name, value in model.state_dict().items():
        yield name, value.detach().cpu()


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a is b or (a.device == b.device and a.data_ptr() == b.data_ptr() and a.shape == b.shape)
