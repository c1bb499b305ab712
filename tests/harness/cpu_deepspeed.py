"""Lightning's DeepSpeedStrategy, allowed to run on CPU processes. Test-only.

Lightning refuses DeepSpeed without CUDA (``setup_environment``) and validates CUDA device indices
(``setup_distributed``). DeepSpeed itself trains ZeRO 0-3 on CPU with gloo, so this subclass removes exactly those
two refusals and gives each process an indexed CPU device. Everything else - the engine, ZeRO partitioning,
checkpoints - is DeepSpeed's and Lightning's own code. ``release`` frees what DeepSpeed keeps of a finished fit, so
that its gloo process groups can really be destroyed before the interpreter exits (``lightning_compress.teardown``).
"""

from __future__ import annotations

import functools
import gc
import sys
from typing import Any

import torch
from lightning_fabric.utilities.seed import reset_seed
from pytorch_lightning.strategies import DDPStrategy, DeepSpeedStrategy


def skip_shm_comm_build() -> None:
    """Make DeepSpeed skip its shared-memory comm op (a 40-99 s JIT build on first use).

    ``build_shm_op`` returning ``None`` is DeepSpeed's own fallback when the op is unavailable: collectives then go
    through torch.distributed (gloo). The module is reached through ``sys.modules`` because ``deepspeed.comm.torch``
    as an attribute path resolves to the ``torch`` package.
    """
    import deepspeed.comm.torch  # noqa: F401  (registers the module)

    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None


def deepspeed_config(stage: int, micro_batch_size: int) -> dict[str, Any]:
    """A ZeRO config for CPU tests: ZeRO-3 keeps no parameter resident, so every one is really partitioned."""
    zero: dict[str, Any] = {"stage": stage}
    if stage == 3:
        zero["stage3_param_persistence_threshold"] = 0
    return {
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_clipping": 0.0,
    }


class CPUDeepSpeedStrategy(DeepSpeedStrategy):
    """DeepSpeedStrategy on ``accelerator="cpu"`` with the gloo backend."""

    strategy_name = "deepspeed_cpu_test"

    def __init__(self, stage: int = 2, micro_batch_size: int = 1, **kwargs: Any) -> None:
        kwargs.setdefault("process_group_backend", "gloo")
        kwargs.setdefault("config", deepspeed_config(stage, micro_batch_size))
        super().__init__(stage=stage, **kwargs)

    def setup_environment(self) -> None:
        skip_shm_comm_build()
        DDPStrategy.setup_environment(self)  # skips DeepSpeedStrategy's CUDA-only check

    def setup_distributed(self) -> None:
        reset_seed()  # as DeepSpeedStrategy does, minus its CUDA device-index validation
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    @property
    def root_device(self) -> torch.device:
        return torch.device("cpu", self.local_rank)

    def release(self) -> None:
        """Free what DeepSpeed keeps of the finished fit, so that only the trainer and the model hold its process
        groups (and the groups go with them).

        DeepSpeed's own ``engine.destroy()`` removes the engine's hooks. Two module-level references outlive it, each
        keeping the model, its parameters' ``ds_process_group`` and so the gloo backends and their threads alive until
        the interpreter finalizes, where a thread still releasing a collective's tensors aborts the process: ZeRO-3
        pushes the root module on ``parameter_offload.FWD_MODULE_STACK`` at engine setup and never pops it, and
        DeepSpeed memoizes methods with ``functools.lru_cache``, class-level caches whose keys hold the instances
        (ZeRO-3's ``PartitionedParameterCoordinator.__params_to_release``, once its trace is complete).
        ``launch.run_fit`` fails a fit that still leaves a backend's threads at exit, so a new leak shows up there.
        """
        engine = self.model
        if not hasattr(engine, "destroy"):
            return
        engine.destroy()
        offload = sys.modules.get("deepspeed.runtime.zero.parameter_offload")
        if offload is not None:
            offload.FWD_MODULE_STACK[:] = [m for m in offload.FWD_MODULE_STACK if m is not engine.module]
        for memo in gc.get_objects():
            if isinstance(memo, functools._lru_cache_wrapper) and memo.__module__.startswith("deepspeed."):
                memo.cache_clear()
