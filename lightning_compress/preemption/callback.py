"""PreemptionCheckpoint: on SLURM's warning signal, one checkpoint at the next optimizer step, the job requeued, the
fit ended; the requeued job resumes from it exactly.

Why not Lightning's own requeue (``SLURMEnvironment(auto_requeue=True)``): it saves the checkpoint inside the signal
handler, on every rank at whatever point each one is interrupted (Lightning issue #21406: hangs and corrupt files),
and leaves every ``hpc_ckpt_*`` it ever wrote. Here the handler only sets a flag. After each optimizer step the
ranks agree on it (one collective), and all of them save at the same step; the checkpoint is written under a
temporary name, vouched for in ``preemption.json`` and renamed into place by rank 0, and older ones are deleted. The
job is requeued only then, and the fit ends at once without its fit-end work (no int8 conversion, export or final
report of a run that is not over): the exit Lightning's own tuner callbacks use.

The checkpoint is Lightning's, so it holds everything a callback keeps in ``state_dict`` (masks, schedule
positions, observers, ranks, stabiliser statistics), the loops' progress and, with a stateful loader (the bundled
DataModules use torchdata's ``StatefulDataLoader``), the position inside the epoch. This callback adds each rank's
random states, which Lightning does not save.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Any

import torch.distributed as dist
from typing_extensions import override

from lightning_compress import arguments
from lightning_compress._lightning import (
    Callback,
    end_fit_now,
    pl,
    rank_zero_info,
    restore_signal_on_teardown,
    spawns_ranks,
    submodule,
)
from lightning_compress.preemption import files, rng, slurm

#: Signals that cannot be caught, or that mean something else to a training process. SIGTERM is Lightning's: its
#: handler makes the fit raise at the next batch, before a step boundary could be agreed on.
RESERVED = frozenset(
    {"SIGKILL", "SIGSTOP", "SIGINT", "SIGTERM", "SIGCHLD", "SIGSEGV", "SIGBUS", "SIGFPE", "SIGILL", "SIGABRT"}
)


def catchable_signals() -> list[str]:
    return sorted(s.name for s in signal.valid_signals() if isinstance(s, signal.Signals) and s.name not in RESERVED)


class PreemptionCheckpoint(Callback):
    """Survive preemption and time limits: checkpoint at a step boundary on ``signal``, requeue, resume exactly.

    Args:
        signal: the signal the scheduler sends before it stops the job: SLURM's ``#SBATCH --signal=USR1@90``
            (the slurm/ scripts) sends SIGUSR1 90 s before the time limit, and ``scancel --signal=USR1 JOB`` sends
            it at once. Give it with or without the ``SIG`` prefix.
        keep: how many preemption checkpoints stay in ``default_root_dir`` (the newest); older ones are deleted.
        requeue: ``scontrol requeue`` the job once the checkpoint is in place. Default (None): when running as a
            SLURM job. False: save and end the fit, and leave restarting to whoever sent the signal.

    The requeued job resumes by itself: Lightning resumes a SLURM job from the newest ``hpc_ckpt_<N>.ckpt`` of its
    ``default_root_dir`` when ``fit`` gets no ``ckpt_path``. Give every job its own ``default_root_dir`` (slurm/
    does). Before that checkpoint is loaded, this callback checks it against ``preemption.json`` and refuses one
    that was changed, cut short or written by another job: the run fails, naming the file, and never silently starts
    over. Outside SLURM, resume with ``trainer.fit(model, ckpt_path="hpc")``.
    """

    def __init__(self, signal: str = "SIGUSR1", keep: int = 1, requeue: bool | None = None) -> None:
        if not isinstance(signal, str):
            raise arguments.refusal("signal", signal, "a signal name such as 'SIGUSR1'")
        name = signal.upper() if signal.upper().startswith("SIG") else f"SIG{signal.upper()}"
        valid = catchable_signals()
        if name not in valid:
            raise arguments.refusal(
                "signal",
                signal,
                f"one of {', '.join(valid)}",
                hint="SLURM's `--signal=USR1@90` sends SIGUSR1; SIGTERM and SIGINT are Lightning's own.",
            )
        self.signal = name
        self.keep = arguments.integer("keep", keep, minimum=1, hint="the newest checkpoints kept; 1 is enough.")
        self.requeue = None if requeue is None else arguments.flag("requeue", requeue)
        self._requested = False
        self._checked_step: int | None = None
        self._previous_handler: Any = None
        self._installed = False
        self._rng_states: list[dict[str, Any]] | None = None  # every rank's, while a preemption checkpoint is saved
        self._restore_rng: list[dict[str, Any]] | None = None
        self._epoch_end = False  # the checkpoint being written follows an epoch's last batch
        self._restored_early = False  # load_state_dict restored the random states (a checkpoint at an epoch's end)
        self._rank: tuple[int, int] | None = None  # (global rank, world size), for load_state_dict
        self.job: str | None = None
        self.saved: Path | None = None  # the checkpoint this fit was preempted into

    @property
    def requested(self) -> bool:
        """Whether the signal arrived in this process (the ranks agree on it at the next optimizer step)."""
        return self._requested

    # ---- the signal ---------------------------------------------------------------------------------------------

    def _on_signal(self, signum: int, frame: Any) -> None:
        self._requested = True  # nothing else: the checkpoint is written at the next step boundary

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if sum(isinstance(cb, PreemptionCheckpoint) for cb in trainer.callbacks) > 1:
            raise ValueError("Trainer(callbacks=...) holds more than one PreemptionCheckpoint; keep one.")
        if spawns_ranks(trainer):
            raise ValueError(
                "PreemptionCheckpoint cannot end a fit whose ranks were spawned by Lightning (`strategy='ddp_spawn'`"
                " or a notebook strategy). HINT: start one process per rank: srun (slurm/), torchrun, or"
                " `strategy='ddp'`."
            )
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("PreemptionCheckpoint must be set up in the main thread: only it can catch signals.")
        self.job = slurm.job_key()
        self._rank = (trainer.global_rank, trainer.world_size)
        self._check_resume_checkpoint(trainer)
        self._requested = False
        self._checked_step = None
        number = signal.Signals[self.signal]
        self._previous_handler = signal.getsignal(number)
        signal.signal(number, self._on_signal)  # before Lightning's: it installs its own only where none is
        self._installed = True

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._installed:
            number = signal.Signals[self.signal]
            signal.signal(number, self._previous_handler)
            restore_signal_on_teardown(trainer, number, self._previous_handler)
            self._installed = False

    def _check_resume_checkpoint(self, trainer: pl.Trainer) -> None:
        """Refuse, on every rank, the checkpoint Lightning is about to resume this SLURM job from, when it fails
        its manifest entry. Rank 0 reads it; the verdict is broadcast."""
        slurm_environment = submodule("plugins.environments").SLURMEnvironment
        if not slurm_environment.detect():
            return
        verdict = None
        if trainer.is_global_zero:
            path = files.latest(Path(trainer.default_root_dir))
            try:
                if path is not None:
                    files.verify(path, self.job)
            except files.CheckpointRefused as err:
                verdict = str(err)
        verdict = trainer.strategy.broadcast(verdict, src=0)
        if verdict is not None:
            raise files.CheckpointRefused(verdict)

    # ---- the step boundary --------------------------------------------------------------------------------------

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Creating a loader iterator draws from the global RNG (DataLoader's base seed). Lightning creates the resumed
        # epoch's iterator before this hook. Mid-epoch, the run never stopped had created it before the checkpoint:
        # restore here, after it. At an epoch's end, it created the next epoch's iterator after the checkpoint, so
        # load_state_dict restored before this one was created; only if this iterator turns out empty (a loader
        # that resumes into its finished epoch) does Lightning run an empty epoch first and create the next
        # epoch's iterator after on_train_epoch_start, where the states are restored again.
        if self._restore_rng is not None and not self._restored_early:
            self._restore_now(trainer)

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._restore_rng is not None:  # the resumed iterator was empty: no batch has run since the resume
            self._restore_now(trainer)

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        self._restore_rng, self._restored_early = None, False

    def _restore_now(self, trainer: pl.Trainer) -> None:
        assert self._restore_rng is not None
        if len(self._restore_rng) == trainer.world_size:
            rng.restore(self._restore_rng[trainer.global_rank])
        self._restore_rng, self._restored_early = None, False

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step == self._checked_step:  # no optimizer step since the last check (gradient accumulation)
            return
        self._checked_step = step
        preempted = self._requested
        if trainer.world_size > 1:
            preempted = trainer.strategy.reduce_boolean_decision(preempted, all=False)
        if preempted:
            self._preempt(trainer)

    def should_requeue(self) -> bool:
        return self.job is not None if self.requeue is None else self.requeue

    def _preempt(self, trainer: pl.Trainer) -> None:
        folder = Path(trainer.default_root_dir)
        final = Path(trainer.strategy.broadcast(str(files.next_path(folder)) if trainer.is_global_zero else None))
        written = files.temporary_path(final)
        if trainer.is_global_zero and written.exists():  # left by a save that was itself cut short
            files.remove(written)
        trainer.strategy.barrier("PreemptionCheckpoint.clear")
        self._rng_states = gather_objects(rng.capture(), trainer.world_size)
        self._epoch_end = bool(trainer.fit_loop.epoch_loop.batch_progress.is_last_batch)
        try:
            trainer.save_checkpoint(written)  # every rank: DeepSpeed writes each rank's shards
        finally:
            self._rng_states = None
        if trainer.is_global_zero:
            removed = files.commit(written, final, self.job, trainer.global_step, self.keep)
            note = f"; deleted {', '.join(p.name for p in removed)}" if removed else ""
            rank_zero_info(f"PreemptionCheckpoint: step {trainer.global_step} saved to {final}{note}")
        trainer.strategy.barrier("PreemptionCheckpoint.commit")
        self.saved = final
        if trainer.is_global_zero and self.should_requeue():
            if self.job is not None:  # said first: a requeue stops the job's steps, maybe before this line is out
                rank_zero_info(f"PreemptionCheckpoint: requeueing SLURM job {self.job}")
            problem = slurm.requeue(self.job) if self.job is not None else "this is not a SLURM job"
            if problem is not None:
                warn = submodule("utilities").rank_zero_warn
                warn(f"PreemptionCheckpoint: could not requeue ({problem}); {final} is saved")
        end_fit_now()  # teardown runs; on_train_end and on_fit_end (int8 conversion, exports, reports) do not

    # ---- state --------------------------------------------------------------------------------------------------

    @override
    def state_dict(self) -> dict[str, Any]:
        return {} if self._rng_states is None else {"rng": self._rng_states, "epoch_end": self._epoch_end}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restore_rng = state_dict.get("rng")
        self._restored_early = False
        # After an epoch's last batch: restore before Lightning creates the next epoch's loader iterator (in the
        # fit loop's setup_data, before on_train_start), so that it draws what the run never stopped drew.
        if self._restore_rng is not None and state_dict.get("epoch_end") and self._rank is not None:
            rank, world_size = self._rank
            if len(self._restore_rng) == world_size:
                rng.restore(self._restore_rng[rank])
                self._restored_early = True


def gather_objects(obj: Any, world_size: int) -> list[Any]:
    """``obj`` of every rank, by rank (a collective when there is more than one)."""
    if world_size == 1 or not (dist.is_available() and dist.is_initialized()):
        return [obj]
    gathered: list[Any] = [None] * world_size
    dist.all_gather_object(gathered, obj)
    return gathered
