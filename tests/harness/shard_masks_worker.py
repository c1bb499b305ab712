"""One rank of the sharded-mask check: ZeRO-3 shard masks against the masks computed on the gathered weights.

Run by ``tests/test_zero3_sharded_masks.py`` under ``torchrun --nproc-per-node=2``. The layers are partitioned by
DeepSpeed's own ``zero.Init`` (real ZeRO-3 shards, the last one padded: sizes that 2 does not divide), one of them a
transformers ``Conv1D`` (stored ``(in, out)``). Their weights are rounded to a few levels, so that many weights tie at
every threshold (the hard case: which of the tied weights go). For each pattern and scope, a run of rising
sparsities, with the weights moving between updates: at each update the shard masks of
``sharded.shard_masks`` are put back together and compared with ``patterns.compute_masks`` on the gathered weights.

Usage: torchrun --nproc-per-node=2 shard_masks_worker.py OUT_DIR
"""

from __future__ import annotations

import gc
import json
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
import torch.distributed as dist
from cpu_deepspeed import skip_shm_comm_build
from launch import exit_record
from torch import nn
from transformers.pytorch_utils import Conv1D

from lightning_compress import distributed
from lightning_compress.pruning.patterns import Pattern, Scope, Unstructured, compute_masks, register_pattern
from lightning_compress.pruning.sharded import shard_masks
from lightning_compress.teardown import destroy_process_groups


@register_pattern
@dataclass(frozen=True)
class MasksOnly(Pattern):
    """A pattern that implements ``masks()`` alone (no unit methods), as a user's own pattern may."""

    name: ClassVar[str] = "masks-only"

    def masks(
        self, scope: Scope, sparsity: float, weights: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        return Unstructured().masks(scope, sparsity, weights, masks)


RUNS: list[tuple[str, Scope, list[float]]] = [
    ("unstructured", "global", [0.3, 0.55, 0.8, 0.95]),
    ("unstructured", "layer", [0.3, 0.55, 0.8, 0.95]),
    ("2:4", "global", [0.1, 0.3, 0.5]),
    ("2:4", "layer", [0.1, 0.3, 0.5]),
    ("1:4", "global", [0.2, 0.75]),
    ("channel", "layer", [0.25, 0.5, 0.75]),
    ("masks-only", "global", [0.4, 0.7]),
    ("masks-only", "layer", [0.4, 0.7]),
]


def build() -> nn.ModuleDict:
    import deepspeed

    config = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}, "train_batch_size": 2}
    with deepspeed.zero.Init(config_dict_or_path=config, remote_device="cpu"):
        return nn.ModuleDict(
            {
                "linear": nn.Linear(12, 7),  # 84 weights
                "conv": nn.Conv2d(4, 6, 3),  # 216 weights, N:M along the 4 input channels
                "gpt2_mlp": Conv1D(12, 16),  # stored (16, 12): 16 inputs, 12 outputs
                "wide": nn.Linear(36, 25),  # 900 weights
            }
        )


def set_weights(model: nn.ModuleDict, seed: int, levels: int | None) -> None:
    """Seeded values on every rank alike; ``levels``: rounded to that many steps per unit (ties everywhere)."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.values():
        weight = module.weight
        with distributed.gathered([weight], modifier_rank=0):
            value = torch.randn(weight.shape, generator=generator)
            weight.data.copy_(value if levels is None else (value * levels).round() / levels)


def transposed_names(model: nn.ModuleDict) -> set[str]:
    return {f"{name}.weight" for name, module in model.items() if isinstance(module, Conv1D)}


def out_in(tensors: dict[str, torch.Tensor], transposed: set[str]) -> dict[str, torch.Tensor]:
    return {name: t.t().contiguous() if name in transposed else t for name, t in tensors.items()}


def check_run(model: nn.ModuleDict, pattern_text: str, scope: Scope, sparsities: list[float], levels: int | None):
    pattern = Pattern.parse(pattern_text)
    params = {f"{name}.weight": module.weight for name, module in model.items()}
    transposed = transposed_names(model)
    full_masks: dict[str, torch.Tensor] = {}
    shards: dict[str, torch.Tensor] = {}
    records = []
    for step, sparsity in enumerate(sparsities):
        set_weights(model, seed=100 * step + len(pattern_text), levels=levels)
        weights = dict(zip(params, distributed.full_values(list(params.values())), strict=True))
        expected = out_in(
            compute_masks(pattern, scope, sparsity, out_in(weights, transposed), out_in(full_masks, transposed)),
            transposed,
        )
        shards = shard_masks(pattern, scope, sparsity, params, shards, transposed)
        got = {name: distributed.unshard(params[name], shards[name]) for name in params}
        records.append(
            {
                "pattern": pattern_text,
                "scope": scope,
                "levels": levels,
                "sparsity": sparsity,
                "equal": {name: bool(torch.equal(got[name], expected[name])) for name in params},
                "pruned": sum(int((~m).sum()) for m in expected.values()),
                "ties_at_threshold": ties_at_threshold(weights, full_masks, expected),
            }
        )
        full_masks = expected
    return records


def ties_at_threshold(weights: dict, before: dict, after: dict) -> bool:
    """Whether some live weights of equal magnitude were split by this update (some pruned, some kept)."""
    for name, weight in weights.items():
        live = before.get(name, torch.ones_like(after[name]))
        pruned_now = live & ~after[name]
        kept = after[name]
        if pruned_now.any() and kept.any():
            largest_pruned = weight.abs()[pruned_now].max()
            if bool((weight.abs()[kept] == largest_pruned).any()):
                return True
    return False


def main(out_dir: str) -> None:
    skip_shm_comm_build()
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    model = build()
    records = []
    for levels in (4, None):
        for pattern_text, scope, sparsities in RUNS:
            records += check_run(model, pattern_text, scope, sparsities, levels)
    rank = dist.get_rank()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(records))
    dist.barrier()
    # ZeRO-3 parameters hold their process group (``ds_process_group``): while the model lives, so do the gloo
    # backend and its threads, and one still releasing a collective's tensors at interpreter exit aborts the process
    # (lightning_compress.teardown). Free the model, then destroy the groups, then collect what held them.
    del model
    gc.collect()
    destroy_process_groups()
    gc.collect()
    Path(out_dir, f"exit{rank}.json").write_text(json.dumps(exit_record()))


if __name__ == "__main__":
    main(sys.argv[1])
