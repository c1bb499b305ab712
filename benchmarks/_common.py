"""What the benchmark scripts share: quiet Trainer settings, environment notes, result files, weight sparsity."""

from __future__ import annotations

import datetime
import json
import logging
import os
import platform
import statistics
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


def env_markdown(env: dict[str, Any], command: str) -> str:
    return (
        f"- command: `{command}`\n"
        f"- date: {env['date']}\n"
        f"- torch {env['torch']}, pytorch-lightning {env['pytorch_lightning']}, Python {env['python']}\n"
        f"- torch threads: {env['torch_threads']} (`torch.set_num_threads`); machine: {env['machine']}\n"
    )
