"""The preemption checkpoints of one run folder: their names, the manifest that vouches for them, commit and pruning.

Checkpoints are named as Lightning's own SLURM requeue names them, ``hpc_ckpt_<N>.ckpt`` in the trainer's
``default_root_dir``: a requeued ``trainer.fit(model)`` under SLURM resumes from the highest ``N`` by itself (a file,
or a DeepSpeed checkpoint folder). Lightning reads the number of any name that contains ``hpc_ckpt_``, so the
temporary name a checkpoint is written under must not contain it.

``preemption.json`` beside them records, per checkpoint, the job that wrote it, its step and a SHA-256 of every file
in it. The entry is written before the checkpoint is renamed into place, so a checkpoint that has a name has an
entry; a resume checks the entry first and refuses a checkpoint that was changed or cut short, or that another job
wrote.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

MANIFEST = "preemption.json"
PREFIX = "hpc_ckpt_"
NAME = re.compile(rf"^{PREFIX}(\d+)\.ckpt$")


class CheckpointRefused(RuntimeError):
    """The checkpoint a requeued run would resume from is not one it may trust."""


def numbered(folder: Path) -> dict[int, Path]:
    """The ``hpc_ckpt_<N>.ckpt`` entries of ``folder`` by ``N``."""
    if not folder.is_dir():
        return {}
    found = {}
    for entry in folder.iterdir():
        match = NAME.match(entry.name)
        if match:
            found[int(match.group(1))] = entry
    return found


def latest(folder: Path) -> Path | None:
    """The checkpoint Lightning resumes a SLURM run from: the highest ``N``."""
    entries = numbered(folder)
    return entries[max(entries)] if entries else None


def next_path(folder: Path) -> Path:
    entries = numbered(folder)
    return folder / f"{PREFIX}{max(entries, default=0) + 1}.ckpt"


def temporary_path(final: Path) -> Path:
    """Where ``final`` is written before it is renamed into place (no ``hpc_ckpt_`` in the name)."""
    return final.with_name(f".writing-{final.name.removeprefix(PREFIX)}")


def digests(path: Path) -> dict[str, str]:
    """SHA-256 of ``path`` (key ``""``) or of every file under the folder ``path`` (keys: relative paths)."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    result = {}
    for file in files:
        sha = hashlib.sha256()
        with file.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                sha.update(block)
        result["" if file == path else file.relative_to(path).as_posix()] = sha.hexdigest()
    return result


def remove(path: Path) -> None:
    """Delete a checkpoint: a file, or a DeepSpeed checkpoint folder."""
    shutil.rmtree(path) if path.is_dir() else path.unlink()


def read_manifest(folder: Path) -> dict[str, Any]:
    path = folder / MANIFEST
    if not path.exists():
        return {"checkpoints": {}}
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointRefused(f"{path} is not valid JSON ({err}): it cannot vouch for any checkpoint") from err
    manifest.setdefault("checkpoints", {})
    return manifest


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    """Replace ``preemption.json`` atomically (a reader sees the old one or the new one)."""
    temporary = folder / f".{MANIFEST}.writing"
    temporary.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    os.replace(temporary, folder / MANIFEST)


def commit(written: Path, final: Path, job: str | None, step: int, keep: int) -> list[Path]:
    """Vouch for ``written`` in the manifest, rename it to ``final``, then delete the older preemption checkpoints
    beyond the newest ``keep``. Returns what was deleted. Only checkpoints the manifest lists are ever deleted."""
    folder = final.parent
    manifest = read_manifest(folder)
    manifest["checkpoints"][final.name] = {"job": job, "step": step, "sha256": digests(written)}
    write_manifest(folder, manifest)
    os.replace(written, final)
    ours = sorted((n, p) for n, p in numbered(folder).items() if p.name in manifest["checkpoints"])
    removed = [path for _, path in ours[:-keep]]
    for path in removed:
        remove(path)
        del manifest["checkpoints"][path.name]
    if removed:
        write_manifest(folder, manifest)
    return removed


def verify(path: Path, job: str | None) -> dict[str, Any] | None:
    """The manifest entry of the checkpoint ``path``, after checking it; None when the manifest does not list it (a
    checkpoint this callback did not write, which Lightning's own requeue may have). Raises
    :class:`CheckpointRefused` naming the file when it was written by another job or no longer matches its digests.
    """
    entry = read_manifest(path.parent)["checkpoints"].get(path.name)
    if entry is None:
        return None
    if job is not None and entry["job"] is not None and entry["job"] != job:
        raise CheckpointRefused(
            f"{path} was written by SLURM job {entry['job']}, not by this job ({job}): refusing to resume another job's"
            " run. HINT: give every job its own `default_root_dir` (slurm/env.sh uses runs/<job id>)."
        )
    found = digests(path) if path.exists() else {}
    expected = entry["sha256"]
    if found != expected:
        names = expected.keys() | found.keys()
        damaged = sorted(name or path.name for name in names if found.get(name) != expected.get(name))
        raise CheckpointRefused(
            f"{path} (step {entry['step']}) does not match what was written: {', '.join(damaged)} changed or missing."
            " Refusing to resume from it, and refusing to start over silently. HINT: delete it to resume from the"
            " previous checkpoint, if one is left, or from scratch."
        )
    return entry
