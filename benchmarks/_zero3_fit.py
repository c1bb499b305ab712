"""One DeepSpeed ZeRO-3 fit on 2 CPU processes, measured per rank: what ``zero3_memory.py`` runs for each
configuration. Lightning's launcher starts rank 1 by running this script again.

Usage: python benchmarks/_zero3_fit.py SPEC.json  (SPEC: model, config, steps, batch, out_dir, seed)

Each rank writes ``rank{N}.json``: its peak resident memory over the process (``ru_maxrss``) and over the training
loop alone (the kernel's high-water mark, reset when training starts: ``/proc/self/clear_refs``), the resident memory
when training starts, the training loop's wall time and each step's, and the rank's share of the parameters.
The model is built in the LightningModule's ``__init__`` (as a fine-tuning script loads a pretrained model), so every
rank holds it whole until DeepSpeed partitions it: the process peak includes that, the training peak does not.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "harness"))  # the CPU DeepSpeed strategy (Lightning refuses CPU DeepSpeed)

from cpu_deepspeed import CPUDeepSpeedStrategy, deepspeed_config  # noqa: E402

from lightning_compress._lightning import Callback, pl  # noqa: E402


def callbacks(config: str, steps: int) -> list[Callback]:
    """The configuration's callbacks; schedules end halfway through the fit, updating every ``steps // 4``."""
    from lightning_compress import GradualPruning, LowRankRefactoring, QuantizationAwareTraining

    ramp = {"start_step": 0, "end_step": steps // 2, "update_every": max(1, steps // 4)}
    one_shot = {"start_step": 0, "end_step": 1, "schedule": "constant"}
    configs = {
        "none": list,
        "prune_global": lambda: [GradualPruning(0.9, **ramp)],
        "prune_layer": lambda: [GradualPruning(0.9, scope="layer", **ramp)],
        "prune_2to4": lambda: [GradualPruning(pattern="2:4", scope="layer", **ramp)],
        "lowrank_one_shot": lambda: [LowRankRefactoring(rank_ratio=0.25, **one_shot)],
        "lowrank_ramp": lambda: [LowRankRefactoring(rank_ratio=0.25, **ramp)],
        "qat": lambda: [QuantizationAwareTraining(weight_bits=8, activation_bits=8)],
    }
    return configs[config]()


CONFIGS = ("none", "prune_global", "prune_layer", "prune_2to4", "lowrank_one_shot", "lowrank_ramp", "qat")


class MLP(pl.LightningModule):
    """``depth`` x Linear(width, width) + ReLU (8 x 2048: 33.6M parameters), regression on fixed random data."""

    def __init__(self, width: int = 2048, depth: int = 8) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for _ in range(depth):
            layers += [nn.Linear(width, width), nn.ReLU()]
        self.net = nn.Sequential(*layers[:-1])
        self.width = width

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-4)

    def batches(self, count: int, batch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        generator = torch.Generator().manual_seed(0)
        shape = (batch, self.width)
        return [tuple(torch.randn(shape, generator=generator) for _ in "xy") for _ in range(count)]


class GPT2(pl.LightningModule):
    """transformers' GPT-2, 8 layers of width 1024 (16 heads), vocabulary 8192: 109M parameters, language modelling
    on fixed random tokens (sequences of 32)."""

    def __init__(self) -> None:
        super().__init__()
        from transformers import GPT2Config, GPT2LMHeadModel

        config = GPT2Config(n_embd=1024, n_layer=8, n_head=16, vocab_size=8192, n_positions=64)
        self.model = GPT2LMHeadModel(config)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        return self.model(input_ids=batch, labels=batch).loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-4)

    def batches(self, count: int, batch: int) -> list[torch.Tensor]:
        generator = torch.Generator().manual_seed(0)
        return [torch.randint(0, 8192, (batch, 32), generator=generator) for _ in range(count)]


MODELS = {"mlp": MLP, "gpt2": GPT2}


def resident_kb(field: str) -> int:
    """``VmRSS`` (now) or ``VmHWM`` (peak since the last reset) of this process, in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


class Measure(Callback):
    """Per rank: resident memory and the high-water mark of the training loop, and its wall time per step."""

    def __init__(self) -> None:
        self.steps: list[float] = []
        self._step_started = 0.0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        import gc

        gc.collect()
        self.rss_train_start_kb = resident_kb("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # the high-water mark starts again from the current RSS
        self.share = sum(getattr(p, "ds_tensor", p).numel() for p in pl_module.parameters())
        self.trained = sum(getattr(p, "ds_numel", p.numel()) for p in pl_module.parameters() if p.requires_grad)
        self.largest = max(getattr(p, "ds_numel", p.numel()) for p in pl_module.parameters())
        self.started = time.perf_counter()

    def on_train_batch_start(self, *args: Any) -> None:
        self._step_started = time.perf_counter()

    def on_train_batch_end(self, *args: Any) -> None:
        self.steps.append(time.perf_counter() - self._step_started)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.train_s = time.perf_counter() - self.started
        self.peak_train_kb = resident_kb("VmHWM")


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    pl.seed_everything(spec["seed"])
    torch.set_num_threads(1)
    model = MLP(spec["width"]) if spec["model"] == "mlp" else MODELS[spec["model"]]()
    data = model.batches(spec["steps"], spec["batch"])
    measure = Measure()
    strategy = CPUDeepSpeedStrategy(stage=3, micro_batch_size=spec["batch"], config={
        **deepspeed_config(3, spec["batch"]),
        "zero_optimization": {"stage": 3},  # DeepSpeed's defaults: small parameters stay whole on every rank
    })  # fmt: skip
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy=strategy, max_steps=spec["steps"], logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[*callbacks(spec["config"], spec["steps"]), measure],
    )  # fmt: skip
    trainer.fit(model, train_dataloaders=torch.utils.data.DataLoader(data, batch_size=None))
    record = {
        "rank": trainer.global_rank,
        "peak_process_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        "peak_train_kb": measure.peak_train_kb,
        "rss_train_start_kb": measure.rss_train_start_kb,
        "train_s": measure.train_s,
        "step_s": measure.steps,
        "param_share": measure.share,
        "params_trained": measure.trained,
        "largest_param": measure.largest,
    }
    Path(spec["out_dir"], f"rank{trainer.global_rank}.json").write_text(json.dumps(record))
    trainer.strategy.release()
    from lightning_compress.teardown import destroy_process_groups

    destroy_process_groups()
    for child in getattr(trainer.strategy.launcher, "procs", []):  # rank 0 started rank 1: wait for it
        if child.wait(timeout=120) != 0:
            sys.exit(f"rank 1 exited with {child.returncode}")


if __name__ == "__main__":
    main(sys.argv[1])
