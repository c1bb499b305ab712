"""A user's own 2-process DDP script on CPU: ``Trainer.fit`` and nothing after it (no teardown of its own).

Lightning's launcher runs this same script again for rank 1. An ``atexit`` hook registered first - so it runs last,
just before interpreter finalization - writes ``exit{RANK}.json`` (``launch.exit_record``). With ``--callback`` the
Trainer gets a GradualPruning; without, it is the plain-Lightning control.

Usage: python user_ddp_script.py OUT_DIR [--callback]
"""

from __future__ import annotations

import atexit
import json
import os
import sys
from pathlib import Path

from launch import exit_record

from lightning_compress._lightning import pl
from lightning_compress.data import DigitsDataModule
from lightning_compress.models import ImageClassifier


def write_record(out_dir: Path) -> None:
    (out_dir / f"exit{os.environ.get('LOCAL_RANK', '0')}.json").write_text(json.dumps(exit_record()))


if __name__ == "__main__":
    out_dir = Path(sys.argv[1])
    atexit.register(write_record, out_dir)
    from lightning_compress import GradualPruning

    callbacks = [GradualPruning(0.5, end_step=4, update_every=2)] if "--callback" in sys.argv else []
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_steps=4,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        default_root_dir=out_dir,
    )
    trainer.fit(ImageClassifier(image_size=8), datamodule=DigitsDataModule())
