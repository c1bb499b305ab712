"""The manifest: what a compressed file records about its model, its modules and its tensors; encoded, read, checked.

See :mod:`lightning_compress.export` for its layout. Writing builds it with :func:`model_record`,
:func:`module_records` and :func:`encode_metadata`; reading validates it with :func:`read_manifest` and
:func:`part_keys` before a single tensor is decoded.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_compress._lightning import saved_hyperparameters
from lightning_compress.export.errors import fail
from lightning_compress.packing import CODECS, PackingError, get_codec, meta_shape_dtype
from lightning_compress.protocol import Rebuildable

FORMAT = "lightning_compress"
VERSION = 1
SUPPORTED_VERSIONS = (1,)
MANIFEST_KEY = "lightning_compress"
MANIFEST_SHA_KEY = "lightning_compress.sha256"
#: Classes under this package are recorded as modules, and trusted at load without being named.
BUILTIN_TRUSTED_PREFIX = "lightning_compress"
PART_SEP = "::"


def encode_metadata(manifest: dict[str, Any]) -> dict[str, str]:
    """The safetensors metadata that stores ``manifest`` (with its checksum)."""
    text = json.dumps(manifest, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return {MANIFEST_KEY: text, MANIFEST_SHA_KEY: hashlib.sha256(text.encode()).hexdigest()}


def part_key(name: str, part: str) -> str:
    """The safetensors key of one part of one state-dict tensor: ``net.fc1.weight::values``."""
    return f"{name}{PART_SEP}{part}"


def sha256(tensor: torch.Tensor) -> str:
    """The checksum the manifest records for one stored part: SHA-256 of its bytes."""
    data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
    return hashlib.sha256(data.numpy()).hexdigest()


# ---------------------------------------------------------------------------------------------------------- write


def model_record(model: nn.Module) -> dict[str, Any]:
    """The model's class and, when they can rebuild it, its init arguments (else why not)."""
    record = _class_record(type(model), "init_args")
    init_args, reason = _init_args(model)
    if init_args is None:
        record["not_rebuildable"] = reason
    else:
        record["init_args"] = init_args
    return record


def module_records(model: nn.Module) -> dict[str, dict[str, Any]]:
    """``{qualified name: record}`` for the submodules ``load_compressed`` must put in place of the rebuilt ones:
    those whose class is defined under ``lightning_compress.`` and is :class:`~lightning_compress.protocol.Rebuildable`
    (a user's own layers are built by the user's model class itself)."""
    records = {}
    for name, module in model.named_modules():
        if not name or not type(module).__module__.startswith(BUILTIN_TRUSTED_PREFIX + "."):
            continue
        if not isinstance(module, Rebuildable):
            continue
        record = _class_record(type(module), "args")
        args = module.rebuild_args()
        if isinstance(args, dict) and all(isinstance(key, str) for key in args) and _json_roundtrips(args):
            record["args"] = args
        else:
            record["not_rebuildable"] = f"its rebuild_args() {args!r} do not survive JSON"
        records[name] = record
    return records


def _class_record(cls: type, args_key: str) -> dict[str, Any]:
    return {
        "class_path": f"{cls.__module__}.{cls.__qualname__}",
        "module": cls.__module__,
        "qualname": cls.__qualname__,
        args_key: None,
    }


def _init_args(model: nn.Module) -> tuple[dict[str, Any] | None, str]:
    """The JSON-serialisable arguments that rebuild ``model``'s class, or None and why not."""
    cls = type(model)
    if cls.__module__ == "__main__" or "<locals>" in cls.__qualname__:
        return None, f"{cls.__qualname__} is defined in __main__ or inside a function, so it cannot be imported"
    saved = saved_hyperparameters(model)
    if saved is None:
        return None, "it is not a LightningModule that called `self.save_hyperparameters()` in `__init__`"
    args = dict(model.hparams)
    bad = [key for key, value in args.items() if not _json_roundtrips(value)]
    if bad or not all(isinstance(key, str) for key in args):
        return None, f"its hyperparameters {bad or list(args)} are not JSON-serialisable (tuples, objects, NaN)"
    try:
        inspect.signature(cls).bind(**args)
    except TypeError as err:
        return None, f"its hyperparameters {sorted(args)} are not arguments of {cls.__qualname__}: {err}"
    return args, ""


def _json_roundtrips(value: Any) -> bool:
    try:
        return json.loads(json.dumps(value, allow_nan=False)) == value
    except (TypeError, ValueError):
        return False


# ----------------------------------------------------------------------------------------------------------- read


def read_manifest(source: Path, header: dict[str, Any]) -> dict[str, Any]:
    """The manifest in ``header`` (the file's safetensors header), with its format, version and checksum checked."""
    metadata = header.get("__metadata__")
    text = metadata.get(MANIFEST_KEY) if isinstance(metadata, dict) else None
    if not isinstance(text, str):
        raise fail(
            source,
            "is not a lightning_compress file: a safetensors file without the `lightning_compress` manifest."
            " HINT: files written by save_compressed carry it; a plain safetensors file loads with"
            " safetensors.torch.load_file.",
        )
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as err:
        raise fail(source, f"is corrupted: its manifest is not valid JSON ({err}).") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else manifest
        raise fail(source, f"is not a lightning_compress file: manifest `format` is {found!r}, expected {FORMAT!r}.")
    version = manifest.get("version")
    if version not in SUPPORTED_VERSIONS or isinstance(version, bool):
        raise fail(
            source,
            f"has manifest version {version!r}; this lightning_compress reads versions {list(SUPPORTED_VERSIONS)}."
            " HINT: a newer version wrote it: upgrade lightning_compress.",
        )
    if hashlib.sha256(text.encode()).hexdigest() != metadata.get(MANIFEST_SHA_KEY):
        raise fail(source, "is corrupted: its manifest does not match its SHA-256.")
    if not isinstance(manifest.get("tensors"), dict) or not isinstance(manifest.get("model"), dict):
        raise fail(source, "is corrupted: its manifest has no `tensors` or `model` object.")
    return manifest


def part_keys(source: Path, name: str, entry: Any) -> dict[str, str]:
    """``{part: file key}`` for one manifest tensor entry, with its codec and metadata validated."""
    try:
        if not isinstance(entry, dict):
            raise PackingError("its entry is not a JSON object")
        codec = get_codec(entry.get("codec"))
        meta_shape_dtype(entry.get("meta"))
        names = codec.part_names(entry["meta"])
    except PackingError as err:
        raise fail(source, f"tensor {name!r}: {err} Known codecs: {sorted(CODECS)}.") from None
    return {part: part_key(name, part) for part in names}
