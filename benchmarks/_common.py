"""What the benchmark scripts share: quiet Trainer settings, environment notes, result files, weight sparsity, and the
fine-tuning helpers of the accuracy benchmarks (progress lines, a Trainer-free copy, test accuracy)."""

from __future__ import annotations

import copy
import datetime
import json
import logging
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn

RESULTS = Path(__file__).resolve().parent / "results"
MACHINE_NOTE = "2-core shared CPU (other jobs were running tests at the same time), no GPU"

#: Trainer settings that keep a benchmark quiet and free of work it does not measure.
QUIET = dict(
    accelerator="cpu",
    devices=1,
    logger=False,
    enable_checkpointing=False,
    enable_progress_bar=False,
    enable_model_summary=False,
    num_sanity_val_steps=0,
    limit_val_batches=0,
    deterministic=False,
)


def set_threads(threads: int) -> None:
    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)  # no "GPU available" chatter per run
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(threads)
    except RuntimeError:  # already set in this process
        pass


def environment(threads: int) -> dict[str, Any]:
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "pytorch_lightning": pl.__version__,
        "python": platform.python_version(),
        "torch_threads": threads,
        "cpu_count": os.cpu_count(),
        "machine": MACHINE_NOTE,
    }


def weight_sparsity(model: nn.Module) -> dict[str, Any]:
    """Fraction of exact zeros in every Conv/Linear ``weight`` (biases not counted), per layer and over all."""
    layers, zeros, total = {}, 0, 0
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            w = module.weight.detach()
            z = int((w == 0).sum())
            layers[name] = {"zeros": z, "numel": w.numel(), "sparsity": z / w.numel()}
            zeros, total = zeros + z, total + w.numel()
    return {"overall": zeros / total if total else 0.0, "zeros": zeros, "numel": total, "layers": layers}


def spread(values: list[float]) -> dict[str, float]:
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def write_results(name: str, payload: dict[str, Any], markdown: str) -> tuple[Path, Path]:
    RESULTS.mkdir(parents=True, exist_ok=True)
    json_path, md_path = RESULTS / f"{name}.json", RESULTS / f"{name}.md"
    json_path.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    md_path.write_text(markdown)
    return json_path, md_path


def command_line() -> str:
    """How this benchmark was started, its script path relative to the project root (for the results files)."""
    import sys

    script = Path(sys.argv[0]).resolve()
    root = Path(__file__).resolve().parent.parent
    shown = script.relative_to(root).as_posix() if script.is_relative_to(root) else script.name
    return " ".join(["python", shown, *sys.argv[1:]])


def env_markdown(env: dict[str, Any], command: str) -> str:
    return (
        f"- command: `{command}`\n"
        f"- date: {env['date']}\n"
        f"- torch {env['torch']}, pytorch-lightning {env['pytorch_lightning']}, Python {env['python']}\n"
        f"- torch threads: {env['torch_threads']} (`torch.set_num_threads`); machine: {env['machine']}\n"
    )


class Progress(pl.Callback):
    """Prints the training loss every ``every`` steps and records each step's wall time (``times``, seconds:
    ``on_train_batch_start`` to ``on_train_batch_end`` of this callback)."""

    def __init__(self, config: str, every: int) -> None:
        self.config, self.every, self.t0 = config, every, time.perf_counter()
        self.times: list[float] = []
        self._t = 0.0

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self._t = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self.times.append(time.perf_counter() - self._t)
        if trainer.global_step % self.every == 0:
            loss = trainer.callback_metrics.get("train/loss")
            print(
                f"[{self.config}] step {trainer.global_step} at {time.perf_counter() - self.t0:.0f} s, "
                f"train/loss {float(loss) if loss is not None else float('nan'):.3f}",
                flush=True,
            )


def detached_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` that leaves a LightningModule's Trainer behind."""
    trainer = model.__dict__.get("_trainer")
    return copy.deepcopy(model, {} if trainer is None else {id(trainer): None})


@torch.no_grad()
def evaluate(model: nn.Module, loader: Any, limit: int | None) -> dict[str, Any]:
    """Accuracy over the test loader (first ``limit`` examples if set), the predictions and the wall time."""
    model.eval()
    preds, targets, seen = [], [], 0
    t0 = time.perf_counter()
    for batch in loader:
        logits, y = model.logits_and_targets(batch)
        preds.append(logits.argmax(-1))
        targets.append(y)
        seen += len(y)
        if limit is not None and seen >= limit:
            break
    pred, target = torch.cat(preds), torch.cat(targets)
    if limit is not None:
        pred, target = pred[:limit], target[:limit]
    return {
        "acc": float((pred == target).float().mean()),
        "n": len(target),
        "eval_s": time.perf_counter() - t0,
        "pred": pred,
    }


def public(evaluation: dict[str, Any]) -> dict[str, Any]:
    """An ``evaluate`` result without the predictions (for the JSON file)."""
    return {k: v for k, v in evaluation.items() if k != "pred"}
