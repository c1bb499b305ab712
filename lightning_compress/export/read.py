"""load_compressed: read the header, check everything against the manifest and the model, then decode and load.

Nothing is copied into a model before every check has passed: a failed load leaves a skeleton as it was.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import safetensors
import torch
from torch import nn

from lightning_compress.export.errors import fail, listed
from lightning_compress.export.manifest import part_keys, read_manifest, sha256
from lightning_compress.export.rebuild import check_prefixes, rebuild_model, recorded_modules
from lightning_compress.export.swap import place, swapped
from lightning_compress.packing import PackingError, dtype_name, meta_shape_dtype, unpack

_MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit


def load_compressed(
    path: str | os.PathLike[str],
    model: nn.Module | None = None,
    *,
    trusted_prefixes: Sequence[str] = (),
) -> nn.Module:
    """Read a file written by :func:`save_compressed`; return the model in eval mode, ready for inference.

    The model is ``model`` (a skeleton: a fresh instance of the saved model's class, built with the same arguments)
    or, without one, the class recorded in the file rebuilt from its recorded init arguments. Either way the
    submodules the file records (the int8 layers ``convert_to_int8`` or a QAT export put in place of the float ones,
    the low-rank layers) are each built from their recorded arguments and put in place at their qualified names,
    where the skeleton's own layer must exist and hold a dense weight of the same shape; a skeleton layer that
    already is the recorded class with the recorded arguments is kept. Then the state dict is loaded strictly. So
    an int8 or low-rank export loads into a fresh float ``MyModel()``.

    Every key, shape and dtype is checked before anything is put into or copied into a skeleton: on any error
    (a missing or misshapen layer, a tensor that does not fit) the skeleton is left as it was, and the message
    names the layer or tensor. A class is imported only when its path starts with ``lightning_compress.`` or one of
    ``trusted_prefixes`` (so a file cannot make this process import arbitrary code).
    """
    trusted = check_prefixes(trusted_prefixes)
    if model is not None and not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module skeleton or None, got {type(model).__name__}.")
    source = Path(os.fspath(path))
    header = _read_header(source)
    manifest = read_manifest(source, header)
    _check_parts(source, header, manifest["tensors"])
    target = model if model is not None else rebuild_model(source, manifest["model"], trusted)
    replacements = recorded_modules(source, manifest.get("modules", {}), target, trusted, given=model is not None)
    _check_against(source, manifest["tensors"], swapped(target, replacements) if replacements else target)
    state = _decode(source, manifest["tensors"])
    place(target, replacements)
    target.load_state_dict(state, strict=True)
    return target.eval()


def _read_header(source: Path) -> dict[str, Any]:
    """The safetensors header, with truncation and corruption told apart from "not a safetensors file"."""
    if not source.exists():
        raise fail(source, "no such file. HINT: check the path; save_compressed(model, path) writes one.")
    if not source.is_file():
        raise fail(source, "is not a file (a folder?). HINT: give the path of a file written by save_compressed.")
    size = source.stat().st_size
    with open(source, "rb") as file:
        prefix = file.read(9)
        if len(prefix) < 9:
            raise fail(
                source,
                f"is truncated or empty ({size} bytes): a safetensors file starts with an 8-byte header size"
                " and a JSON header.",
            )
        (header_len,) = struct.unpack("<Q", prefix[:8])
        if prefix[8:9] != b"{" or header_len > _MAX_HEADER_BYTES:
            raise fail(
                source,
                "is not a safetensors file (no JSON header after the first 8 bytes);"
                " lightning_compress files are written by save_compressed.",
            )
        if 8 + header_len > size:
            raise fail(source, f"is truncated: its header needs {8 + header_len} bytes, the file has {size}.")
        file.seek(8)
        raw = file.read(header_len)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise fail(source, f"is corrupted: its header is not valid JSON ({err}).") from None
    if not isinstance(header, dict):
        raise fail(source, "is corrupted: its header is not a JSON object.")
    try:
        data_len = max(
            (int(info["data_offsets"][1]) for key, info in header.items() if key != "__metadata__"), default=0
        )
    except (KeyError, IndexError, TypeError, ValueError):
        raise fail(source, "is corrupted: a tensor entry in its header has no valid `data_offsets`.") from None
    if 8 + header_len + data_len > size:
        raise fail(
            source, f"is truncated: its header describes {8 + header_len + data_len} bytes, the file has {size}."
        )
    if 8 + header_len + data_len < size:
        raise fail(source, f"is corrupted: {size - 8 - header_len - data_len} bytes follow the last tensor.")
    return header


def _check_parts(source: Path, header: dict[str, Any], tensors: dict[str, Any]) -> None:
    """The file holds exactly the parts its manifest lists."""
    stored = set(header) - {"__metadata__"}
    expected = {key for name, entry in tensors.items() for key in part_keys(source, name, entry).values()}
    missing, unexpected = sorted(expected - stored), sorted(stored - expected)
    if missing:
        raise fail(source, f"is missing {len(missing)} part(s) its manifest lists: {listed(missing)}.")
    if unexpected:
        raise fail(
            source,
            f"is corrupted: it holds {len(unexpected)} tensor(s) its manifest does not list: {listed(unexpected)}.",
        )


def _check_against(source: Path, tensors: dict[str, Any], model: nn.Module) -> None:
    """Every key, shape and dtype of the file against ``model.state_dict()``, before anything is copied."""
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    problems = []
    if missing:
        problems.append(f"the model has {len(missing)} tensor(s) the file lacks: {listed(missing)}")
    if unexpected:
        problems.append(f"the file has {len(unexpected)} tensor(s) the model lacks: {listed(unexpected)}")
    for name in sorted(set(expected) & set(tensors)):
        shape, dtype = meta_shape_dtype(tensors[name]["meta"])
        have = expected[name]
        if have.shape != shape or have.dtype != dtype:
            problems.append(
                f"{name!r} is {dtype_name(dtype)}{list(shape)} in the file but"
                f" {dtype_name(have.dtype)}{list(have.shape)} in the model"
            )
    if problems:
        raise fail(
            source,
            f"does not fit {type(model).__name__} (nothing was loaded): {listed(problems, quote=False, sep='; ')}."
            " HINT: pass a skeleton built with the same arguments (and dtype) as the saved model.",
        )


def _decode(source: Path, tensors: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Every tensor, its parts checked against their SHA-256 before they are unpacked."""
    state = {}
    try:
        with safetensors.safe_open(os.fspath(source), framework="pt") as file:
            for name, entry in tensors.items():
                parts = {part: file.get_tensor(key) for part, key in part_keys(source, name, entry).items()}
                checksums = entry.get("sha256")
                for part, value in parts.items():
                    if not isinstance(checksums, dict) or checksums.get(part) != sha256(value):
                        raise fail(
                            source, f"is corrupted: part {part!r} of tensor {name!r} does not match its SHA-256."
                        )
                state[name] = unpack(parts, entry)
    except PackingError as err:
        raise fail(source, f"is corrupted: tensor {name!r}: {err}") from None
    except safetensors.SafetensorError as err:
        raise fail(source, f"is corrupted: safetensors cannot read it ({err}).") from None
    return state
