"""ImageClassifier: the reference CNN as a LightningModule (for the demo, the benchmarks and the tests)."""

from __future__ import annotations

from typing import Any, Literal

import torch

from lightning_compress import arguments
from lightning_compress.models._base import ClassifierBase, positive_number
from lightning_compress.models.cnn import ReferenceCNN, check_shape


class ImageClassifier(ClassifierBase):
    """``self.net = ReferenceCNN(...)`` trained with cross-entropy; one optimizer (DeepSpeed needs exactly one)."""

    def __init__(
        self,
        in_channels: int = 1,
        image_size: int = 28,
        num_classes: int = 10,
        lr: float = 1e-3,
        optimizer: Literal["adam", "sgd"] = "adam",
    ) -> None:
        check_shape(in_channels, image_size, num_classes)
        positive_number("lr", lr, hint="Adam's usual learning rate is 1e-3.")
        arguments.choice("optimizer", optimizer, ("adam", "sgd"), hint="adam (the reference recipe) or sgd.")
        super().__init__(num_classes)
        self.save_hyperparameters()
        self.net = ReferenceCNN(in_channels, image_size, num_classes)
        self.example_input_array = torch.zeros(1, in_channels, image_size, image_size)  # FLOPs, latency, summary

    def setup(self, stage: str) -> None:
        """Refuse a DataModule whose images do not fit this network, before any step runs."""
        data = getattr(self.trainer, "datamodule", None)
        for name in ("in_channels", "image_size", "num_classes"):
            given = getattr(data, name, None)
            if given is not None and given != self.hparams[name]:
                raise ValueError(
                    f"`{name}`={self.hparams[name]} does not match the data: {type(data).__name__} has {name}={given}."
                    f" HINT: set `model.init_args.{name}: {given}` in the recipe (or {name}={given} in Python)."
                )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def logits_and_targets(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = batch
        return self(x), y

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.hparams.optimizer == "sgd":
            return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
