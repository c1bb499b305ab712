"""Single-process fits of the reference CNN on the bundled digits, as the callback tests run them.

The digits train split holds 1,168 images: 19 batches of 64 per epoch, so step 19 is the first epoch's last batch,
the one point a Lightning fit with a plain DataLoader resumes from exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from lightning_compress._lightning import Callback, pl
from lightning_compress.data import DigitsDataModule
from lightning_compress.models import ImageClassifier

EPOCH_END_STEP = 19


def fit(
    quiet: dict[str, Any],
    callbacks: list[Callback],
    max_steps: int,
    model: Callable[[], ImageClassifier] | None = None,
    **trainer: Any,
) -> ImageClassifier:
    """Seed 0, a fresh ImageClassifier (or ``model()``), ``max_steps`` steps with ``callbacks``; returns the
    trained model."""
    pl.seed_everything(0)
    model = ImageClassifier(image_size=8) if model is None else model()
    trainer_ = pl.Trainer(max_steps=max_steps, callbacks=callbacks, **{**quiet, **trainer})
    trainer_.fit(model, datamodule=DigitsDataModule())
    return model


def whole_and_resumed(
    quiet: dict[str, Any], folder: Path, callbacks: Callable[[], list[Callback]], max_steps: int
) -> tuple[ImageClassifier, ImageClassifier]:
    """One run of ``max_steps`` that checkpoints at step 19, and a fresh Trainer and model resumed from that
    checkpoint to ``max_steps``; ``callbacks`` builds each run's callbacks anew."""
    from pytorch_lightning.callbacks import ModelCheckpoint

    saver = ModelCheckpoint(folder, "{step}", every_n_train_steps=EPOCH_END_STEP, save_top_k=-1)
    whole = fit({**quiet, "enable_checkpointing": True}, [*callbacks(), saver], max_steps=max_steps)
    pl.seed_everything(0)
    resumed = ImageClassifier(image_size=8)
    trainer = pl.Trainer(max_steps=max_steps, callbacks=callbacks(), **quiet)
    trainer.fit(resumed, datamodule=DigitsDataModule(), ckpt_path=folder / f"step={EPOCH_END_STEP}.ckpt")
    return whole, resumed
