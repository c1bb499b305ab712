"""ImageClassifier: the reference CNN as a LightningModule (for the demo, the benchmarks and the tests)."""

from __future__ import annotations

from typing import Any, Literal

import torch

from lightning_compress.data._checks import check_choice, check_int, check_positive_float
from lightning_compress.models._base import ClassifierBase
from lightning_compress.models.cnn import ReferenceCNN


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
        check_int("in_channels", in_channels)
        check_int("image_size", image_size, minimum=4)
        check_int("num_classes", num_classes, minimum=2)
        check_positive_float("lr", lr)
        check_choice("optimizer", optimizer, ("adam", "sgd"))
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
