"""The GPU checks, for one H100/H200-class GPU: DeepSpeed ZeRO-2/3 in bf16 with each callback, 2:4-pruned Linear
layers on torch's semi-structured sparse kernels against dense, and CUDA peak memory of dense against compressed
training and inference.

Committed results (benchmarks/results/gpu.{json,md}) come from a GPU machine, with a CUDA build of torch:

    .venv/bin/python benchmarks/gpu.py

Without CUDA (or with `--dry-run`) it is a dry run: every step at tiny sizes on the CPU, in fp32, and each CUDA-only
step (bf16, the semi-structured sparse kernels, CUDA memory) skipped with a line that says so; the dry run checks
that the script works, and its figures measure nothing. CI runs it (`--smoke`, which is the dry run).

1. `zero`: for ZeRO stage 2 and 3 (Lightning's `DeepSpeedStrategy`, one GPU, `precision="bf16-mixed"`; on the CPU the
   project's test-only CPU strategy, fp32), a fit of transformers' GPT-2 (12 layers of width 1024, vocabulary 32000,
   batch 8 x 512 tokens; dry run: 2 x 64, batch 2 x 16) with each configuration: no callback, `GradualPruning(0.9)`,
   `GradualPruning("2:4")`, one-shot `LowRankRefactoring(rank_ratio=0.25)`, `QuantizationAwareTraining(8, 8)`.
   Each fit runs in its own process (`--worker`), so CUDA memory starts from nothing: median step time after the
   first 3 steps, CUDA peak memory allocated, final loss, and the sparsity reached (what the masks hold).
2. `sparse24`: `F.linear` of bf16 activations (tokens x in) by a weight (out x in) pruned 2:4 by the project's own
   pattern, dense against `torch.sparse.to_sparse_semi_structured` (CUTLASS kernels), timed with CUDA events
   (median of 50 after 10 warm-up), for the shapes of GPT-2's and Llama's projections; and the largest difference
   between the two outputs. The dry run checks the masks are 2:4 and skips the kernels.
3. `inference`: CUDA peak memory and latency of a bf16 forward (batch 8 x 512) of the dense GPT-2 against the same
   model low-rank at rank_ratio 0.25 (factorised, truncated).
"""

from __future__ import annotations

import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from _common import ROOT, Benchmark, table

CONFIGS = ("none", "prune_global", "prune_2to4", "lowrank_one_shot", "qat")
SHAPES = ((4096, 1024, 4096), (4096, 4096, 1024), (4096, 4096, 4096), (4096, 4096, 11008), (4096, 11008, 4096))
BENCHMARK = Benchmark(
    "gpu",
    __doc__,
    shared={"configs": ",".join(CONFIGS), "steps": 20},
    options={
        "dry_run": (False, "tiny sizes on the CPU, CUDA-only steps skipped (the default without CUDA)"),
        "stages": ("2,3", "comma-separated ZeRO stages"),
        "worker": ("", "internal: run the one fit a spec file describes, in this process"),
    },
    smoke={"dry_run": True, "steps": 4, "configs": "none,prune_2to4,lowrank_one_shot", "stages": "3"},
    choices={"configs": CONFIGS},
)


def gpt2(dry: bool) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    if dry:
        return GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=512, n_positions=64))
    return GPT2LMHeadModel(GPT2Config(n_embd=1024, n_layer=12, n_head=16, vocab_size=32000, n_positions=512))


def callbacks(config: str, steps: int) -> list[Any]:
    from lightning_compress import GradualPruning, LowRankRefactoring, QuantizationAwareTraining

    ramp = {"start_step": 0, "end_step": max(2, steps // 2), "update_every": max(1, steps // 4)}
    one_shot = {"start_step": 0, "end_step": 1, "schedule": "constant"}
    return {
        "none": list,
        "prune_global": lambda: [GradualPruning(0.9, **ramp)],
        "prune_2to4": lambda: [GradualPruning(pattern="2:4", scope="layer", **ramp)],
        "lowrank_one_shot": lambda: [LowRankRefactoring(rank_ratio=0.25, **one_shot)],
        "qat": lambda: [QuantizationAwareTraining(weight_bits=8, activation_bits=8)],
    }[config]()


# ------------------------------------------------------------------------------------------------ 1. ZeRO fits


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """One fit, in this process: the figures of section 1."""
    from lightning_compress import GradualPruning
    from lightning_compress._lightning import Callback, pl, submodule

    dry, steps = spec["dry_run"], spec["steps"]
    pl.seed_everything(0)
    if dry:
        torch.set_num_threads(1)
    model_core = gpt2(dry)
    vocab, length, batch = (512, 16, 2) if dry else (32000, 512, 8)
    generator = torch.Generator().manual_seed(0)
    data = [torch.randint(0, vocab, (batch, length), generator=generator) for _ in range(steps)]

    class LM(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = model_core

        def training_step(self, ids: torch.Tensor, index: int) -> torch.Tensor:
            loss = self.model(input_ids=ids, labels=ids).loss
            self.last_loss = float(loss.detach())
            return loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.Adam(self.parameters(), lr=1e-4)

    class Steps(Callback):
        def __init__(self) -> None:
            self.times: list[float] = []

        def on_train_batch_start(self, *args: Any) -> None:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.started = time.perf_counter()

        def on_train_batch_end(self, *args: Any) -> None:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self.started)

    if dry:
        sys.path.insert(0, str(ROOT / "tests" / "harness"))
        from cpu_deepspeed import CPUDeepSpeedStrategy

        strategy, precision = CPUDeepSpeedStrategy(stage=spec["stage"], micro_batch_size=batch), "32-true"
        accelerator = "cpu"
    else:
        DeepSpeedStrategy = submodule("strategies").DeepSpeedStrategy  # noqa: N806

        strategy, precision, accelerator = DeepSpeedStrategy(stage=spec["stage"]), "bf16-mixed", "gpu"
    timer, compress = Steps(), callbacks(spec["config"], steps)
    module = LM()
    trainer = pl.Trainer(accelerator=accelerator, devices=1, strategy=strategy, precision=precision, max_steps=steps,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[*compress, timer])  # fmt: skip
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(data, batch_size=None))
    pruning = [cb for cb in compress if isinstance(cb, GradualPruning)]
    result = {
        "median_step_ms": 1000 * statistics.median(timer.times[3:] or timer.times),
        "cuda_peak_gb": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
        "final_loss": module.last_loss,
        "sparsity": pruning[0].sparsity() if pruning else None,
        "params_trained": sum(getattr(p, "ds_numel", p.numel()) for p in module.parameters() if p.requires_grad),
    }
    if dry:  # the test strategy frees what DeepSpeed keeps, so no gloo thread outlives the fit (teardown.py)
        trainer.strategy.release()
    from lightning_compress.teardown import destroy_process_groups

    destroy_process_groups()
    return result


def zero_fits(run: Any, dry: bool) -> dict[str, dict[str, Any]]:
    results = {}
    for stage in [int(s) for s in run.args.stages.split(",") if s]:
        for config in run.items("configs"):
            with tempfile.TemporaryDirectory(prefix="gpu_fit_") as folder:
                spec = {"stage": stage, "config": config, "steps": run.args.steps, "dry_run": dry, "out": folder}
                Path(folder, "spec.json").write_text(json.dumps(spec))
                env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "HF_HUB_OFFLINE": "1"}
                for var in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "SLURM_JOB_ID"):
                    env.pop(var, None)
                command = [sys.executable, __file__, "--worker", str(Path(folder, "spec.json"))]
                proc = subprocess.run(command, env=env, cwd=folder, text=True, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, timeout=3000)  # fmt: skip
                if proc.returncode != 0:
                    raise RuntimeError(f"zero{stage}/{config} failed ({proc.returncode}):\n{proc.stdout[-3000:]}")
                results[f"zero{stage}/{config}"] = json.loads(Path(folder, "result.json").read_text())
            print(f"zero{stage}/{config}: {results[f'zero{stage}/{config}']}", flush=True)
    return results


# ------------------------------------------------------------------------------------------------ 2. 2:4 kernels


def sparse24(dry: bool) -> dict[str, Any]:
    from lightning_compress.pruning.patterns import Pattern

    pattern = Pattern.parse("2:4")
    shapes = ((8, 64, 64),) if dry else SHAPES
    results: dict[str, Any] = {}
    for tokens, fan_in, fan_out in shapes:
        device, dtype = ("cpu", torch.float32) if dry else ("cuda", torch.bfloat16)
        weight = torch.randn(fan_out, fan_in, device=device, dtype=dtype)
        mask = pattern.masks("layer", 0.5, {"w": weight.float()}, {})["w"]
        groups = mask.reshape(fan_out, fan_in // 4, 4).sum(dim=-1)
        entry: dict[str, Any] = {"mask_is_2to4": bool((groups == 2).all())}
        if not dry:
            pruned = weight * mask
            x = torch.randn(tokens, fan_in, device=device, dtype=dtype)
            sparse = torch.sparse.to_sparse_semi_structured(pruned)
            dense_ms = cuda_ms(functools.partial(F.linear, x, pruned))
            sparse_ms = cuda_ms(functools.partial(F.linear, x, sparse))
            difference = (F.linear(x, pruned) - F.linear(x, sparse)).abs().max()
            entry.update({"dense_ms": dense_ms, "sparse_ms": sparse_ms, "speedup": dense_ms / sparse_ms,
                          "max_abs_diff": float(difference)})  # fmt: skip
        results[f"{tokens}x{fan_in}->{fan_out}"] = entry
    return results


def cuda_ms(fn: Any, warmup: int = 10, iters: int = 50) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


# ------------------------------------------------------------------------------------------------ 3. inference


def inference(dry: bool) -> dict[str, Any]:
    from lightning_compress import LowRankRefactoring

    results = {}
    for name in ("dense", "lowrank_0.25"):
        torch.manual_seed(0)
        model = gpt2(dry).eval()
        if name != "dense":
            lowrank = LowRankRefactoring(rank_ratio=0.25, start_step=0, end_step=1, schedule="constant")
            lowrank.prepare(model)
            lowrank.truncate(model)
        params = sum(p.numel() for p in model.parameters())
        if dry:
            results[name] = {"params": params, "cuda_peak_gb": None, "latency_ms": None}
            continue
        model = model.to("cuda", torch.bfloat16)
        ids = torch.randint(0, 32000, (8, 512), device="cuda")
        torch.cuda.reset_peak_memory_stats()
        with torch.no_grad():
            latency = cuda_ms(functools.partial(model, input_ids=ids), warmup=3, iters=10)
        results[name] = {"params": params, "cuda_peak_gb": torch.cuda.max_memory_allocated() / 2**30,
                         "latency_ms": latency}  # fmt: skip
        del model
        torch.cuda.empty_cache()
    return results


# ------------------------------------------------------------------------------------------------ report


def main(argv: list[str] | None = None) -> None:
    run = BENCHMARK.start(argv)
    if run.args.worker:
        spec = json.loads(Path(run.args.worker).read_text())
        Path(spec["out"], "result.json").write_text(json.dumps(worker(spec)))
        return
    dry = run.args.dry_run or not torch.cuda.is_available()
    skipped = []
    if dry:
        why = "--dry-run" if run.args.dry_run else "no CUDA device"
        skipped = [f"DRY RUN ({why}): tiny sizes on the CPU in fp32; its figures measure nothing. Skipped:",
                   "bf16 (ZeRO fits ran in fp32 on the CPU test strategy)",
                   "the semi-structured 2:4 kernels (torch.sparse.to_sparse_semi_structured needs CUDA)",
                   "CUDA peak memory and CUDA-event latency"]  # fmt: skip
        for line in skipped:
            print(line, flush=True)
    fits, kernels, forward = zero_fits(run, dry), sparse24(dry), inference(dry)
    device = "CPU (dry run)" if dry else torch.cuda.get_device_name()
    lines = ["", f"Device: {device}.", *(f"- {line}" for line in skipped), "", "## 1. ZeRO fits", ""]
    lines += table(["fit", "median step, ms", "CUDA peak, GB", "final loss", "sparsity", "parameters trained"],
                   [[name, f"{r['median_step_ms']:.0f}", _gb(r["cuda_peak_gb"]), f"{r['final_loss']:.3f}",
                     "-" if r["sparsity"] is None else f"{r['sparsity']:.3f}", f"{r['params_trained']:,}"]
                    for name, r in fits.items()])  # fmt: skip
    lines += ["", "## 2. 2:4 semi-structured kernels against dense (bf16)", ""]
    lines += table(["tokens x in -> out", "mask 2:4", "dense ms", "2:4 ms", "speed-up", "max abs diff"],
                   [[shape, r["mask_is_2to4"], *(f"{r[k]:.3f}" if k in r else "skipped"
                                                 for k in ("dense_ms", "sparse_ms", "speedup", "max_abs_diff"))]
                    for shape, r in kernels.items()])  # fmt: skip
    lines += ["", "## 3. Inference, bf16, batch 8 x 512", ""]
    lines += table(["model", "parameters", "CUDA peak, GB", "latency, ms"],
                   [[name, f"{r['params']:,}", _gb(r["cuda_peak_gb"]),
                     "skipped" if r["latency_ms"] is None else f"{r['latency_ms']:.1f}"]
                    for name, r in forward.items()])  # fmt: skip
    payload = {"dry_run": dry, "device": device, "skipped": skipped, "zero": fits, "sparse24": kernels,
               "inference": forward}  # fmt: skip
    run.finish(payload, "GPU checks: ZeRO in bf16 with each callback, 2:4 kernels, CUDA memory", lines, threads=1)


def _gb(value: float | None) -> str:
    return "skipped" if value is None else f"{value:.2f}"


if __name__ == "__main__":
    main()
