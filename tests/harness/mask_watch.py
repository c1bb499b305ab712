"""Test-only callback: after every optimizer step, check that pruned weights are zero everywhere training keeps them."""

from __future__ import annotations

from typing import Any

import torch

from lightning_compress import GradualPruning
from lightning_compress._lightning import Callback, pl
from lightning_compress.distributed import full_values, has_fp32_master


class MaskWatch(Callback):
    """Records, per step, non-zeros under the masks in the module and in DeepSpeed's fp32 master copy.

    Place it after GradualPruning in ``callbacks`` so it sees the state the pruning callback leaves behind.
    Collective under DeepSpeed (it gathers full values): it runs on every rank.
    """

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        pruning = next(cb for cb in trainer.callbacks if isinstance(cb, GradualPruning))
        full_masks = pruning.full_masks()
        names = sorted(full_masks)
        params = [pl_module.get_parameter(n) for n in names]
        masks = [full_masks[n] for n in names]
        module_values = full_values(params)
        record = {
            "step": trainer.global_step,
            "sparsity": pruning.sparsity(),
            "module_nonzeros_under_mask": sum(
                int((v[~m] != 0).sum()) for v, m in zip(module_values, masks, strict=True)
            ),
            "master_checked": any(has_fp32_master(p) for p in params),
            "master_nonzeros_under_mask": 0,
        }
        if record["master_checked"]:
            from deepspeed.utils import safe_get_full_fp32_param

            for param, mask in zip(params, masks, strict=True):
                master = safe_get_full_fp32_param(param)
                record["master_nonzeros_under_mask"] += int((master[~mask.to(master.device)] != 0).sum())
        self.records.append(record)

    def masks(self, trainer: pl.Trainer) -> dict[str, torch.Tensor]:
        pruning = next(cb for cb in trainer.callbacks if isinstance(cb, GradualPruning))
        return pruning.full_masks()
