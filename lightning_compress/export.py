"""save_compressed / load_compressed: one safetensors file (no pickle) that is really as small as the model.

File layout: every state-dict tensor is stored by the codec :func:`lightning_compress.packing.choose_codec` picks, as
safetensors tensors named ``<tensor>::<part>`` (``net.fc1.weight::bitmask``, ``net.fc1.weight::values``,
``net.fc1.bias::data``). The safetensors metadata holds a versioned JSON manifest under ``"lightning_compress"``::

    {"format": "lightning_compress", "version": 1,
     "model": {"class_path": "pkg.mod.Cls", "module": "pkg.mod", "qualname": "Cls", "init_args": {...} | null,
               "not_rebuildable": "why" (only when init_args is null)},
     "tensors": {"net.fc1.weight": {"codec": "bitmask", "meta": {"shape": [...], "dtype": "float32"},
                                    "sha256": {"bitmask": "...", "values": "..."}}, ...},
     "modules": {"net.fc1": {"class_path": "lightning_compress.quantization.int8.Int8Linear", "module": "...",
                             "qualname": "Int8Linear", "args": {"in_features": 3136, ...}}, ...}}

and its SHA-256 under ``"lightning_compress.sha256"``, so that a flipped byte anywhere is reported, not loaded.
The file's size is the safetensors header plus exactly ``sum(packed_nbytes(t))`` over the state dict.

``modules`` (optional: absent in older files and when there is nothing to record) lists the submodules whose class
is defined under ``lightning_compress.`` and has ``rebuild_args()`` (the int8 layers ``convert_to_int8`` puts in
place of the float ones), with those arguments: ``load_compressed`` without a skeleton rebuilds the model class, then
puts ``cls(**args)`` at each of those names, so an int8 model loads from the file alone. A module whose arguments do
not survive JSON is recorded with ``"args": null`` and ``"not_rebuildable": "why"``.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import inspect
import json
import os
import re
import struct
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch
from torch import nn

from lightning_compress.distributed import full_state_dict
from lightning_compress.packing import (
    CODECS,
    PackingError,
    dtype_name,
    get_codec,
    meta_shape_dtype,
    pack,
    unpack,
)

__all__ = ["FORMAT", "SUPPORTED_VERSIONS", "VERSION", "CompressedFileError", "load_compressed", "save_compressed"]

FORMAT = "lightning_compress"
VERSION = 1
SUPPORTED_VERSIONS = (1,)
MANIFEST_KEY = "lightning_compress"
MANIFEST_SHA_KEY = "lightning_compress.sha256"
BUILTIN_TRUSTED_PREFIX = "lightning_compress"
_PART_SEP = "::"
_MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit
_DOTTED = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")
_MODULE_NAME = re.compile(r"\w+(\.\w+)*")  # named_modules() names: nn.Sequential / ModuleList children are digits
_MAX_LISTED = 10


class CompressedFileError(ValueError):
    """A compressed file that cannot be written or read as asked; the message names the file and what is valid."""


class CompressedFileExistsError(CompressedFileError, FileExistsError):
    """``save_compressed`` refused to replace an existing file (pass ``overwrite=True``)."""


# ----------------------------------------------------------------------------------------------------------- save


def save_compressed(model: nn.Module, path: str | os.PathLike[str], *, overwrite: bool = False) -> int:
    """Write ``model``'s weights, packed, to one safetensors file at ``path``; return the bytes written.

    The file is written to a temporary file in the same folder and moved into place, so ``path`` holds either the
    previous file, untouched, or the complete new one. An existing ``path`` is refused unless ``overwrite=True``.
    Under DeepSpeed ZeRO-3 every rank must call this (the weights are gathered); only global rank 0 writes, and the
    other ranks return 0.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module (a LightningModule is one), got {type(model).__name__}.")
    target = Path(os.fspath(path))
    _check_target(target, overwrite)
    state = full_state_dict(model)  # collective under ZeRO-3: before any rank-dependent branch
    if not _is_writer():
        return 0
    parts: dict[str, torch.Tensor] = {}
    tensors: dict[str, Any] = {}
    for name, tensor in state.items():
        tensor_parts, entry = pack(tensor)
        entry["sha256"] = {}
        for part, value in tensor_parts.items():
            key = f"{name}{_PART_SEP}{part}"
            if key in parts:
                raise CompressedFileError(
                    f"cannot save {target}: two state-dict entries would both be stored as {key!r}."
                )
            parts[key] = value
            entry["sha256"][part] = _sha256(value)
        tensors[name] = entry
    manifest = {"format": FORMAT, "version": VERSION, "model": _model_record(model), "tensors": tensors}
    modules = _module_records(model)
    if modules:
        manifest["modules"] = modules
    return _write_atomic(target, parts, encode_metadata(manifest), overwrite)


def encode_metadata(manifest: dict[str, Any]) -> dict[str, str]:
    """The safetensors metadata that stores ``manifest`` (with its checksum)."""
    text = json.dumps(manifest, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return {MANIFEST_KEY: text, MANIFEST_SHA_KEY: hashlib.sha256(text.encode()).hexdigest()}


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
        raise _exists_error(target)


def _exists_error(target: Path) -> CompressedFileExistsError:
    return CompressedFileExistsError(
        f"{target} already exists and was left as it is."
        " HINT: pass `overwrite=True` to replace it, or choose another path."
    )


def _is_writer() -> bool:
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _sha256(tensor: torch.Tensor) -> str:
    data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
    return hashlib.sha256(data.numpy()).hexdigest()


def _write_atomic(target: Path, parts: dict[str, torch.Tensor], metadata: dict[str, str], overwrite: bool) -> int:
    temp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
    try:
        os.close(os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # 0o666 & ~umask, like a plain open()
        safetensors.torch.save_file(parts, os.fspath(temp), metadata=metadata)
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
        raise _exists_error(target) from None
    except OSError:  # a filesystem without hard links: check, then replace
        if target.exists():
            raise _exists_error(target) from None
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


def _model_record(model: nn.Module) -> dict[str, Any]:
    cls = type(model)
    record: dict[str, Any] = {
        "class_path": f"{cls.__module__}.{cls.__qualname__}",
        "module": cls.__module__,
        "qualname": cls.__qualname__,
        "init_args": None,
    }
    init_args, reason = _init_args(model)
    if init_args is None:
        record["not_rebuildable"] = reason
    else:
        record["init_args"] = init_args
    return record


def _module_records(model: nn.Module) -> dict[str, dict[str, Any]]:
    """``{qualified name: record}`` for the submodules ``load_compressed`` must put in place of the rebuilt ones."""
    records = {}
    for name, module in model.named_modules():
        cls = type(module)
        rebuild_args = getattr(module, "rebuild_args", None)
        if not name or not cls.__module__.startswith(BUILTIN_TRUSTED_PREFIX + ".") or not callable(rebuild_args):
            continue
        record: dict[str, Any] = {
            "class_path": f"{cls.__module__}.{cls.__qualname__}",
            "module": cls.__module__,
            "qualname": cls.__qualname__,
            "args": None,
        }
        args = rebuild_args()
        if isinstance(args, dict) and all(isinstance(key, str) for key in args) and _json_roundtrips(args):
            record["args"] = args
        else:
            record["not_rebuildable"] = f"its rebuild_args() {args!r} do not survive JSON"
        records[name] = record
    return records


def _init_args(model: nn.Module) -> tuple[dict[str, Any] | None, str]:
    """The JSON-serialisable arguments that rebuild ``model``'s class, or None and why not."""
    cls = type(model)
    if cls.__module__ == "__main__" or "<locals>" in cls.__qualname__:
        return None, f"{cls.__qualname__} is defined in __main__ or inside a function, so it cannot be imported"
    # save_hyperparameters() (either Lightning namespace) sets _hparams_initial; `hparams` alone is created on access.
    if not isinstance(getattr(model, "_hparams_initial", None), Mapping):
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


# ----------------------------------------------------------------------------------------------------------- load


def load_compressed(
    path: str | os.PathLike[str],
    model: nn.Module | None = None,
    *,
    trusted_prefixes: Sequence[str] = (),
) -> nn.Module:
    """Read a file written by :func:`save_compressed`; return the model in eval mode, ready for inference.

    With ``model`` (a skeleton of the same architecture), every key, shape and dtype is checked before anything is
    copied into it: on any error the skeleton is left as it was. Without ``model`` the class recorded in the file is
    rebuilt from its recorded init arguments, and the submodules the file records (int8 layers) are put in place,
    each built from its recorded arguments; a class is imported only when its path starts with
    ``lightning_compress.`` or one of ``trusted_prefixes`` (so a file cannot make this process import arbitrary
    code). A skeleton must already have the saved structure (int8 layers included); the file's module records are
    not applied to it.
    """
    trusted = _check_prefixes(trusted_prefixes)
    if model is not None and not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module skeleton or None, got {type(model).__name__}.")
    source = Path(os.fspath(path))
    header = _read_header(source)
    manifest = _read_manifest(source, header)
    _check_parts(source, header, manifest["tensors"])
    if model is None:
        model = _rebuild(source, manifest["model"], trusted)
        _replace_modules(source, manifest.get("modules", {}), model, trusted)
    _check_against(source, manifest["tensors"], model)
    state = _decode(source, manifest["tensors"])
    model.load_state_dict(state, strict=True)
    return model.eval()


def _check_prefixes(prefixes: Sequence[str]) -> tuple[str, ...]:
    if isinstance(prefixes, str) or not isinstance(prefixes, Sequence):
        raise TypeError(
            f"`trusted_prefixes` must be a list of module prefixes, got {prefixes!r}."
            f" HINT: trusted_prefixes=[{prefixes!r}] trusts one prefix."
        )
    cleaned = []
    for prefix in prefixes:
        if not isinstance(prefix, str) or not _DOTTED.fullmatch(prefix.rstrip(".")):
            raise ValueError(
                f"`trusted_prefixes` holds {prefix!r}; each must be a dotted module path such as 'my_project.models'."
            )
        cleaned.append(prefix.rstrip("."))
    return (BUILTIN_TRUSTED_PREFIX, *cleaned)


def _fail(source: Path, message: str) -> CompressedFileError:
    return CompressedFileError(f"{source}: {message}")


def _read_header(source: Path) -> dict[str, Any]:
    """The safetensors header, with truncation and corruption told apart from "not a safetensors file"."""
    if not source.exists():
        raise _fail(source, "no such file. HINT: check the path; save_compressed(model, path) writes one.")
    if not source.is_file():
        raise _fail(source, "is not a file (a folder?). HINT: give the path of a file written by save_compressed.")
    size = source.stat().st_size
    with open(source, "rb") as file:
        prefix = file.read(9)
        if len(prefix) < 9:
            raise _fail(
                source,
                f"is truncated or empty ({size} bytes): a safetensors file starts with an 8-byte header size"
                " and a JSON header.",
            )
        (header_len,) = struct.unpack("<Q", prefix[:8])
        if prefix[8:9] != b"{" or header_len > _MAX_HEADER_BYTES:
            raise _fail(
                source,
                "is not a safetensors file (no JSON header after the first 8 bytes);"
                " lightning_compress files are written by save_compressed.",
            )
        if 8 + header_len > size:
            raise _fail(source, f"is truncated: its header needs {8 + header_len} bytes, the file has {size}.")
        file.seek(8)
        raw = file.read(header_len)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise _fail(source, f"is corrupted: its header is not valid JSON ({err}).") from None
    if not isinstance(header, dict):
        raise _fail(source, "is corrupted: its header is not a JSON object.")
    try:
        data_len = max(
            (int(info["data_offsets"][1]) for key, info in header.items() if key != "__metadata__"), default=0
        )
    except (KeyError, IndexError, TypeError, ValueError):
        raise _fail(source, "is corrupted: a tensor entry in its header has no valid `data_offsets`.") from None
    if 8 + header_len + data_len > size:
        raise _fail(
            source, f"is truncated: its header describes {8 + header_len + data_len} bytes, the file has {size}."
        )
    if 8 + header_len + data_len < size:
        raise _fail(source, f"is corrupted: {size - 8 - header_len - data_len} bytes follow the last tensor.")
    return header


def _read_manifest(source: Path, header: dict[str, Any]) -> dict[str, Any]:
    metadata = header.get("__metadata__")
    text = metadata.get(MANIFEST_KEY) if isinstance(metadata, dict) else None
    if not isinstance(text, str):
        raise _fail(
            source,
            "is not a lightning_compress file: a safetensors file without the `lightning_compress` manifest."
            " HINT: files written by save_compressed carry it; a plain safetensors file loads with"
            " safetensors.torch.load_file.",
        )
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as err:
        raise _fail(source, f"is corrupted: its manifest is not valid JSON ({err}).") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else manifest
        raise _fail(source, f"is not a lightning_compress file: manifest `format` is {found!r}, expected {FORMAT!r}.")
    version = manifest.get("version")
    if version not in SUPPORTED_VERSIONS or isinstance(version, bool):
        raise _fail(
            source,
            f"has manifest version {version!r}; this lightning_compress reads versions {list(SUPPORTED_VERSIONS)}."
            " HINT: a newer version wrote it: upgrade lightning_compress.",
        )
    if hashlib.sha256(text.encode()).hexdigest() != metadata.get(MANIFEST_SHA_KEY):
        raise _fail(source, "is corrupted: its manifest does not match its SHA-256.")
    if not isinstance(manifest.get("tensors"), dict) or not isinstance(manifest.get("model"), dict):
        raise _fail(source, "is corrupted: its manifest has no `tensors` or `model` object.")
    return manifest


def _part_keys(source: Path, name: str, entry: Any) -> dict[str, str]:
    """``{part: file key}`` for one manifest entry, with its codec and metadata validated."""
    try:
        if not isinstance(entry, dict):
            raise PackingError("its entry is not a JSON object")
        codec = get_codec(entry.get("codec"))
        meta_shape_dtype(entry.get("meta"))
        names = codec.part_names(entry["meta"])
    except PackingError as err:
        raise _fail(source, f"tensor {name!r}: {err} Known codecs: {sorted(CODECS)}.") from None
    return {part: f"{name}{_PART_SEP}{part}" for part in names}


def _check_parts(source: Path, header: dict[str, Any], tensors: dict[str, Any]) -> None:
    stored = set(header) - {"__metadata__"}
    expected = {key for name, entry in tensors.items() for key in _part_keys(source, name, entry).values()}
    missing, unexpected = sorted(expected - stored), sorted(stored - expected)
    if missing:
        raise _fail(source, f"is missing {len(missing)} part(s) its manifest lists: {_listed(missing)}.")
    if unexpected:
        raise _fail(
            source,
            f"is corrupted: it holds {len(unexpected)} tensor(s) its manifest does not list: {_listed(unexpected)}.",
        )


def _listed(names: Sequence[str]) -> str:
    shown = ", ".join(repr(n) for n in names[:_MAX_LISTED])
    return shown + (f" and {len(names) - _MAX_LISTED} more" if len(names) > _MAX_LISTED else "")


def _rebuild(source: Path, record: dict[str, Any], trusted: tuple[str, ...]) -> nn.Module:
    module, qualname = record.get("module"), record.get("qualname")
    if not _is_dotted(module) or not _is_dotted(qualname):
        raise _fail(source, f"is corrupted: its recorded model class {module!r}.{qualname!r} is not a dotted path.")
    class_path = f"{module}.{qualname}"
    init_args = record.get("init_args")
    if not isinstance(init_args, dict):
        why = record.get("not_rebuildable") or "no init arguments were recorded"
        raise _fail(
            source,
            f"cannot rebuild {class_path} without a skeleton: {why}. HINT: build the model yourself and pass it:"
            f" load_compressed(path, model={qualname}(...)).",
        )
    _check_trusted(source, module, qualname, trusted)
    cls = _import_module_class(source, module, qualname)
    try:
        return cls(**init_args)
    except Exception as err:
        raise _fail(
            source,
            f"could not rebuild {class_path}(**{init_args}): {type(err).__name__}: {err}."
            " HINT: pass a skeleton with model=...",
        ) from err


def _is_dotted(value: Any) -> bool:
    return isinstance(value, str) and _DOTTED.fullmatch(value) is not None


def _check_trusted(source: Path, module: str, qualname: str, trusted: tuple[str, ...], subject: str = "") -> None:
    class_path = f"{module}.{qualname}"
    if not any(class_path == prefix or class_path.startswith(prefix + ".") for prefix in trusted):
        top = module.split(".")[0]
        raise _fail(
            source,
            f"records the class {class_path}{subject}, which is outside the trusted prefixes {list(trusted)}; nothing"
            f" was imported. HINT: if you trust this file, pass trusted_prefixes=[{top!r}] (or give a skeleton with"
            " model=...).",
        )


def _import_module_class(source: Path, module: str, qualname: str, subject: str = "") -> type[nn.Module]:
    """The class ``module.qualname`` (already checked against the trusted prefixes); it must be an nn.Module."""
    class_path = f"{module}.{qualname}"
    try:
        obj: Any = importlib.import_module(module)
        for attr in qualname.split("."):
            obj = getattr(obj, attr)
    except (ImportError, AttributeError) as err:
        raise _fail(source, f"records the class {class_path}{subject}, which cannot be imported: {err}.") from err
    if not (isinstance(obj, type) and issubclass(obj, nn.Module)):
        raise _fail(source, f"records {class_path}{subject}, which is not a torch.nn.Module subclass.")
    return obj


def _replace_modules(source: Path, records: Any, model: nn.Module, trusted: tuple[str, ...]) -> None:
    """Put ``cls(**args)`` at every name ``records`` (the manifest's ``modules``) lists, in the rebuilt ``model``.

    Every record is validated and trusted before anything is imported; parents are replaced before their children.
    """
    if not isinstance(records, dict):
        raise _fail(source, f"is corrupted: its manifest `modules` is not a JSON object, got {records!r}.")
    checked = []
    for name in sorted(records, key=lambda n: (n.count("."), n)):
        record = records[name]
        subject = f" for module {name!r}"
        if not (isinstance(name, str) and _MODULE_NAME.fullmatch(name)):
            raise _fail(source, f"is corrupted: its module record name {name!r} is not a dotted attribute path.")
        if not isinstance(record, dict):
            raise _fail(source, f"is corrupted: its record{subject} is not a JSON object.")
        module, qualname, args = record.get("module"), record.get("qualname"), record.get("args")
        if not _is_dotted(module) or not _is_dotted(qualname):
            raise _fail(
                source, f"is corrupted: its recorded class {module!r}.{qualname!r}{subject} is not a dotted path."
            )
        if not isinstance(args, dict):
            why = record.get("not_rebuildable") or "no constructor arguments were recorded"
            raise _fail(
                source,
                f"cannot rebuild module {name!r} ({module}.{qualname}) without a skeleton: {why}. HINT: build the model"
                " with that module in place yourself and pass it: load_compressed(path, model=...).",
            )
        _check_trusted(source, module, qualname, trusted, subject)
        checked.append((name, module, qualname, args))
    for name, module, qualname, args in checked:
        subject = f" for module {name!r}"
        cls = _import_module_class(source, module, qualname, subject)
        parent_name, _, child = name.rpartition(".")
        try:
            parent = model.get_submodule(parent_name) if parent_name else model
            if not hasattr(parent, child) or not isinstance(getattr(parent, child), nn.Module):
                raise AttributeError(f"{type(parent).__name__} has no submodule {child!r}")
        except AttributeError as err:
            raise _fail(
                source,
                f"records module {name!r} ({module}.{qualname}), which the rebuilt {type(model).__name__} does not"
                f" have ({err}); nothing was loaded. HINT: pass a skeleton with model=...",
            ) from None
        try:
            replacement = cls(**args)
        except Exception as err:
            raise _fail(
                source,
                f"could not rebuild module {name!r} as {module}.{qualname}(**{args}): {type(err).__name__}: {err};"
                " nothing was loaded. HINT: pass a skeleton with model=...",
            ) from err
        setattr(parent, child, replacement)


def _check_against(source: Path, tensors: dict[str, Any], model: nn.Module) -> None:
    """Every key, shape and dtype of the file against ``model.state_dict()``, before anything is copied."""
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    problems = []
    if missing:
        problems.append(f"the model has {len(missing)} tensor(s) the file lacks: {_listed(missing)}")
    if unexpected:
        problems.append(f"the file has {len(unexpected)} tensor(s) the model lacks: {_listed(unexpected)}")
    for name in sorted(set(expected) & set(tensors)):
        shape, dtype = meta_shape_dtype(tensors[name]["meta"])
        have = expected[name]
        if have.shape != shape or have.dtype != dtype:
            problems.append(
                f"{name!r} is {dtype_name(dtype)}{list(shape)} in the file but"
                f" {dtype_name(have.dtype)}{list(have.shape)} in the model"
            )
    if problems:
        shown = "; ".join(problems[:_MAX_LISTED]) + (
            f"; and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else ""
        )
        raise _fail(
            source,
            f"does not fit {type(model).__name__} (nothing was loaded): {shown}."
            " HINT: pass a skeleton built with the same arguments (and dtype) as the saved model.",
        )


def _decode(source: Path, tensors: dict[str, Any]) -> dict[str, torch.Tensor]:
    state = {}
    try:
        with safetensors.safe_open(os.fspath(source), framework="pt") as file:
            for name, entry in tensors.items():
                parts = {part: file.get_tensor(key) for part, key in _part_keys(source, name, entry).items()}
                checksums = entry.get("sha256")
                for part, value in parts.items():
                    if not isinstance(checksums, dict) or checksums.get(part) != _sha256(value):
                        raise _fail(
                            source, f"is corrupted: part {part!r} of tensor {name!r} does not match its SHA-256."
                        )
                state[name] = unpack(parts, entry)
    except PackingError as err:
        raise _fail(source, f"is corrupted: tensor {name!r}: {err}") from None
    except safetensors.SafetensorError as err:
        raise _fail(source, f"is corrupted: safetensors cannot read it ({err}).") from None
    return state
