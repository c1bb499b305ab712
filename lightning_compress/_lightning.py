"""The one place that chooses the Lightning namespace.

This project imports ``pytorch_lightning`` (the package it is built for). Every other module imports Lightning
through here, so serving the unified ``lightning`` package later is a change to this file alone.
"""

import pytorch_lightning as pl
from pytorch_lightning import Callback, LightningDataModule, LightningModule, Trainer
from pytorch_lightning.utilities import rank_zero_info

__all__ = ["pl", "Callback", "LightningDataModule", "LightningModule", "Trainer", "rank_zero_info"]
