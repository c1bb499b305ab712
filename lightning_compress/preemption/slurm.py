"""What the preemption callback asks of SLURM: which job this is, and to requeue it."""

from __future__ import annotations

import os
import re
import shutil
import subprocess


def job_key(environ: dict[str, str] | None = None) -> str | None:
    """This job's id as SLURM requeues it: ``<array job>_<task>`` for an array task, else ``SLURM_JOB_ID``; None
    outside SLURM. A requeued job keeps it, and no other job has it."""
    env = os.environ if environ is None else environ
    array_job, array_task = env.get("SLURM_ARRAY_JOB_ID"), env.get("SLURM_ARRAY_TASK_ID")
    if array_job and array_task:
        return f"{array_job}_{array_task}"
    return env.get("SLURM_JOB_ID") or None


def requeue(job: str) -> str | None:
    """``scontrol requeue JOB``; None when it worked, else why not (the caller reports it)."""
    if not re.fullmatch(r"[0-9]+(_[0-9]+)?", job):
        return f"{job!r} is not a SLURM job id"
    scontrol = shutil.which("scontrol")
    if scontrol is None:
        return "`scontrol` is not on PATH"
    result = subprocess.run([scontrol, "requeue", job], capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        return f"`scontrol requeue {job}` exited {result.returncode}: {result.stderr.strip()}"
    return None
