"""The project's reference CNN: the 2-conv network Lightning's ModelPruning was measured on (FACTS.md)."""

from __future__ import annotations

import torch
from torch import nn

from lightning_compress import arguments


def check_shape(in_channels: int, image_size: int, num_classes: int) -> None:
    """Refuse a network the data cannot feed: no channels, images too small for two 2x2 poolings, or one class."""
    arguments.integer("in_channels", in_channels, minimum=1, hint="1 for greyscale images, 3 for RGB.")
    arguments.integer("image_size", image_size, minimum=4, hint="the side of the square images; two poolings halve it.")
    arguments.integer("num_classes", num_classes, minimum=2, hint="a classifier needs two classes or more.")


class ReferenceCNN(nn.Module):
    """conv32-pool-conv64-pool-fc128-fc``num_classes`` (3x3 convs, padding 1); ~0.42M parameters on 28x28."""

    def __init__(self, in_channels: int = 1, image_size: int = 28, num_classes: int = 10) -> None:
        super().__init__()
        check_shape(in_channels, image_size, num_classes)
        side = image_size // 4
        self.conv1 = nn.Conv2d(in_channels, 32, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, kernel_size=3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.relu = nn.ReLU()
        self.fc1 = nn.Linear(64 * side * side, 128)
        self.fc2 = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.relu(self.conv1(x)))
        x = self.pool(self.relu(self.conv2(x)))
        return self.fc2(self.relu(self.fc1(x.flatten(1))))
