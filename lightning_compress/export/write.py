"""save_compressed: pack every tensor, record the manifest, and publish the file atomically (never half a file)."""

from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import nn

from lightning_compress.distributed import full_state_dict
from lightning_compress.export.errors import CompressedFileError, exists_error
from lightning_compress.export.manifest import (
    FORMAT,
    VERSION,
    encode_metadata,
    model_record,
    module_records,
    part_key,
    sha256,
)
from lightning_compress.export.swap import export_view
from lightning_compress.packing import pack


def save_compressed(model: nn.Module, path: str | os.PathLike[str], *, overwrite: bool = False) -> int:
    """Write ``model``'s weights, packed, to one safetensors file at ``path``; return the bytes written.

    A layer with an export form is written as that form: a QAT layer that fake-quantizes as its int8 layer, so the
    file of a QAT-trained model is the file of ``convert_to_int8(model)`` (and loads as the int8 model), and its size
    is what the monitor's ``compress/bytes_compressed`` reports. ``model`` itself is not changed (the conversion is
    made layer by layer, for the file only); a QAT layer that does not fake-quantize yet is written as it is.

    The file is written to a temporary file in the same folder and moved into place, so ``path`` holds either the
    previous file, untouched, or the complete new one. An existing ``path`` is refused unless ``overwrite=True``.
    Under DeepSpeed ZeRO-3 every rank must call this (the weights are gathered); only global rank 0 writes, and the
    other ranks return 0.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module (a LightningModule is one), got {type(model).__name__}.")
    target = Path(os.fspath(path))
    _check_target(target, overwrite)
    stored = export_view(model)  # collective under ZeRO-3, as is the state dict: before any rank-dependent branch
    state = full_state_dict(stored)
    if not _is_writer():
        return 0
    parts: dict[str, torch.Tensor] = {}
    tensors: dict[str, Any] = {}
    for name, tensor in state.items():
        tensor_parts, entry = pack(tensor)
        entry["sha256"] = {}
        for part, value in tensor_parts.items():
            key = part_key(name, part)
            if key in parts:
                raise CompressedFileError(
                    f"cannot save {target}: two state-dict entries would both be stored as {key!r}."
                )
            parts[key] = value
            entry["sha256"][part] = sha256(value)
        tensors[name] = entry
    manifest = {"format": FORMAT, "version": VERSION, "model": model_record(model), "tensors": tensors}
    modules = module_records(stored)
    if modules:
        manifest["modules"] = modules
    return _write_atomic(target, parts, encode_metadata(manifest), overwrite)


def _check_target(target: Path, overwrite: bool) -> None:
    if target.is_dir():
        raise CompressedFileError(
            f"cannot save to {target}: it is a folder. HINT: give a file path, e.g. {target}/model.safetensors."
        )
    if not target.parent.is_dir():
        raise CompressedFileError(
            f"cannot save to {target}: the folder {target.parent} does not exist. HINT: create it first."
        )
    if target.exists() and not overwrite:
        raise exists_error(target)


def _is_writer() -> bool:
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _write_atomic(target: Path, parts: dict[str, torch.Tensor], metadata: dict[str, str], overwrite: bool) -> int:
    temp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
    try:
        os.close(os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # 0o666 & ~umask, like a plain open()
        mode = temp.stat().st_mode & 0o777
        safetensors.torch.save_file(parts, os.fspath(temp), metadata=metadata)
        os.chmod(temp, mode)  # save_file replaces the file with a private (0o600) one of its own
        with open(temp, "rb+") as file:
            os.fsync(file.fileno())
        size = temp.stat().st_size
        if overwrite:
            os.replace(temp, target)
        else:
            _publish_new(temp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            temp.unlink()
        raise
    _fsync_folder(target.parent)
    return size


def _publish_new(temp: Path, target: Path) -> None:
    """Move ``temp`` to ``target`` only if ``target`` does not exist, also when another process races us to it."""
    try:
        os.link(temp, target)  # atomic and fails if target exists
    except FileExistsError:
        raise exists_error(target) from None
    except OSError:  # a filesystem without hard links: check, then replace
        if target.exists():
            raise exists_error(target) from None
        os.replace(temp, target)
        return
    temp.unlink()


def _fsync_folder(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not possible everywhere (Windows); the rename is done either way
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
