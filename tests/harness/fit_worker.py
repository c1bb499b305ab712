"""One real Lightning fit, launched as its own process by ``harness.launch.run_fit``.

Lightning's launcher starts the other ranks by running this same script again. Each rank writes
``rank{N}.pt`` (the full model state after training, gathered under ZeRO-3, and the global step); rank 0 also
writes ``initial.pt`` (the weights before the first step).

A finished fit ends its distributed run before the interpreter exits (``lightning_compress.teardown``): the process
groups are destroyed and their last references collected, so the gloo backends join their worker threads here and
no thread is left to abort the process during interpreter finalization. Each rank then writes ``exit{N}.json``: the
native threads still alive and whether a process group still exists.

Usage: python fit_worker.py SPEC.json
"""

from __future__ import annotations

import gc
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from launch import exit_record
from mask_watch import MaskWatch
from signal_at import SignalAt

from lightning_compress._lightning import Callback, pl
from lightning_compress.data import DigitsDataModule
from lightning_compress.distributed import full_state_dict
from lightning_compress.models import ImageClassifier
from lightning_compress.teardown import destroy_process_groups

CHILD_EXIT_TIMEOUT_S = 120  # a rank that finished training ends within seconds


def where(trainer: pl.Trainer) -> dict[str, int]:
    """Which rank of which world this process is, and the step it reached."""
    return {
        "global_step": trainer.global_step,
        "world_size": trainer.world_size,
        "node_rank": trainer.node_rank,
        "local_rank": trainer.local_rank,
    }


class RankSnapshot(Callback):
    """Saves each rank's full view of the weights when training ends (and what a MaskWatch saw)."""

    def __init__(self, out_dir: Path, watch: MaskWatch | None = None) -> None:
        self.out_dir = out_dir
        self.watch = watch
        self.saved = False

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        state = full_state_dict(pl_module)  # collective under ZeRO-3: runs on every rank
        snapshot = {"state_dict": state, **where(trainer)}
        if self.watch is not None:
            snapshot["mask_checks"] = self.watch.records
            snapshot["masks"] = self.watch.masks(trainer)
        torch.save(snapshot, self.out_dir / f"rank{trainer.global_rank}.pt")
        self.saved = True

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.saved = False

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """A preempted fit never reaches ``on_train_end``: record the step it stopped at, without weights."""
        if not self.saved:
            snapshot = {"state_dict": {}, **where(trainer), "preempted": True}
            torch.save(snapshot, self.out_dir / f"rank{trainer.global_rank}.pt")


def build_strategy(spec: dict[str, Any]) -> Any:
    if spec["strategy"] == "deepspeed":
        from cpu_deepspeed import CPUDeepSpeedStrategy, deepspeed_config

        config = deepspeed_config(spec["zero_stage"], spec["batch_size"])
        if spec["zero_stage"] == 3:
            config["zero_optimization"]["stage3_param_persistence_threshold"] = spec["zero3_persistence_threshold"]
        return CPUDeepSpeedStrategy(stage=spec["zero_stage"], micro_batch_size=spec["batch_size"], config=config)
    return spec["strategy"]


def end_distributed_run(trainer: pl.Trainer) -> None:
    """What a program does once its fit is done: release DeepSpeed's hold on the fit, destroy the process groups."""
    from cpu_deepspeed import CPUDeepSpeedStrategy

    if isinstance(trainer.strategy, CPUDeepSpeedStrategy):
        trainer.strategy.release()
    destroy_process_groups()


def main(spec_path: str) -> int:
    """Rank 0's exit status is the fit's: it waits for the ranks Lightning started and fails when one of them did."""
    spec = json.loads(Path(spec_path).read_text())
    rank, children = fit(spec)
    gc.collect()  # the fit's trainer and model, and with them the last references to its process groups
    (Path(spec["out_dir"]) / f"exit{rank}.json").write_text(json.dumps(exit_record()))
    codes = [child.wait(timeout=CHILD_EXIT_TIMEOUT_S) for child in children]
    failed = [f"rank {r} exited with {code}" for r, code in enumerate(codes, start=1) if code != 0]
    if failed:
        print(f"fit_worker: {'; '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


def fit(spec: dict[str, Any]) -> tuple[int, list[subprocess.Popen]]:
    """Run the fit of ``spec`` and end its distributed run; returns this process's global rank and the processes of
    the other ranks when this process started them (Lightning's launcher does so on rank 0)."""
    out_dir = Path(spec["out_dir"])
    pl.seed_everything(spec["seed"], workers=True)
    data = DigitsDataModule(batch_size=spec["batch_size"], seed=spec["seed"])
    model = ImageClassifier(in_channels=data.in_channels, image_size=data.image_size, num_classes=data.num_classes)
    callbacks: list[Callback] = []
    if spec.get("recipe"):
        from lightning_compress import load_recipe

        callbacks = load_recipe(spec["recipe"])
    watch = MaskWatch() if spec.get("watch_masks") else None
    callbacks += [watch] if watch else []
    callbacks.append(RankSnapshot(out_dir, watch))
    if spec.get("preemption"):
        from lightning_compress import PreemptionCheckpoint

        callbacks.append(PreemptionCheckpoint(requeue=False))
    if spec.get("signal_at_step") is not None:
        callbacks.append(SignalAt(spec["signal_at_step"], spec["signal_rank"]))
    if spec.get("checkpoint_every_n_steps"):
        from pytorch_lightning.callbacks import ModelCheckpoint

        every = spec["checkpoint_every_n_steps"]
        callbacks.append(ModelCheckpoint(out_dir / "checkpoints", "{step}", every_n_train_steps=every, save_top_k=-1))
    logger: Any = False
    if spec.get("monitor"):
        from pytorch_lightning.loggers import CSVLogger

        from lightning_compress import CompressionMonitor

        callbacks.append(CompressionMonitor(log_every_n_steps=4, latency_repeats=3))
        logger = CSVLogger(out_dir, name="csv", version=0)
    if spec.get("csv_log") and logger is False:
        from pytorch_lightning.loggers import CSVLogger

        logger = CSVLogger(out_dir, name="csv", version=0)
    if spec.get("mask_module_only"):  # negative control: the known failure, masks written to the module alone
        import lightning_compress.distributed as distributed

        distributed._mask_fp32_master = lambda param, piece: None
    if spec.get("sync_statistics_every_batch"):  # the reference: the totals summed over the ranks at every batch
        from lightning_compress import LowRankRefactoring

        LowRankRefactoring._reads_totals = lambda self, step: True
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=spec["devices"],
        num_nodes=spec.get("num_nodes", 1),
        strategy=build_strategy(spec),
        max_steps=spec["max_steps"],
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=logger,
        log_every_n_steps=1 if spec.get("csv_log") else 50,
        enable_checkpointing=bool(spec.get("checkpoint_every_n_steps")),
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        default_root_dir=out_dir,
    )
    if trainer.global_rank == 0:
        torch.save({k: v.clone() for k, v in model.state_dict().items()}, out_dir / "initial.pt")
    trainer.fit(model, datamodule=data, ckpt_path=spec.get("resume_from"))
    if spec.get("save_checkpoint"):
        trainer.save_checkpoint(out_dir / "final.ckpt")  # every rank: DeepSpeed writes its shards
    end_distributed_run(trainer)
    return trainer.global_rank, list(getattr(trainer.strategy.launcher, "procs", []))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
