"""Rebuilding a model from its file: trusted prefixes, guarded imports, the model and its recorded modules.

A file names classes; this module imports one only when its path starts with ``lightning_compress.`` or one of the
caller's ``trusted_prefixes``, so a file cannot make this process import arbitrary code. Every record is validated
and trusted before anything is imported.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_compress.export.errors import fail
from lightning_compress.export.manifest import BUILTIN_TRUSTED_PREFIX
from lightning_compress.export.swap import place
from lightning_compress.protocol import Rebuildable, dense_weight_shape

_DOTTED = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")
_MODULE_NAME = re.compile(r"\w+(\.\w+)*")  # named_modules() names: nn.Sequential / ModuleList children are digits


def check_prefixes(prefixes: Sequence[str]) -> tuple[str, ...]:
    """The prefixes a load trusts: ``lightning_compress`` and the caller's ``trusted_prefixes``, validated."""
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


def rebuild_model(source: Path, record: dict[str, Any], trusted: tuple[str, ...]) -> nn.Module:
    """The model class the manifest's ``model`` record names, built from its recorded init arguments."""
    module, qualname = record.get("module"), record.get("qualname")
    if not _is_dotted(module) or not _is_dotted(qualname):
        raise fail(source, f"is corrupted: its recorded model class {module!r}.{qualname!r} is not a dotted path.")
    class_path = f"{module}.{qualname}"
    init_args = record.get("init_args")
    if not isinstance(init_args, dict):
        why = record.get("not_rebuildable") or "no init arguments were recorded"
        raise fail(
            source,
            f"cannot rebuild {class_path} without a skeleton: {why}. HINT: build the model yourself and pass it:"
            f" load_compressed(path, model={qualname}(...)).",
        )
    _check_trusted(source, module, qualname, trusted)
    cls = _import_module_class(source, module, qualname)
    try:
        return cls(**init_args)
    except Exception as err:
        raise fail(
            source,
            f"could not rebuild {class_path}(**{init_args}): {type(err).__name__}: {err}."
            " HINT: pass a skeleton with model=...",
        ) from err


def recorded_modules(
    source: Path, records: Any, model: nn.Module, trusted: tuple[str, ...], *, given: bool
) -> dict[str, nn.Module]:
    """``{name: cls(**args)}`` for the modules ``records`` (the manifest's ``modules``) puts into ``model``, each
    checked to stand in for the layer it replaces; ``model`` itself is not changed (``swap.place`` does that).

    Every record is validated and trusted before anything is imported; parents come before their children, and a
    recorded module inside another recorded one is put into that (new) module here rather than returned. A layer of
    ``model`` that already is the recorded class with the recorded arguments is kept. The layer a record replaces
    must exist and have a dense weight of the recorded module's shape (``protocol.dense_weight_shape``); the new
    module goes to that layer's device. ``given``: ``model`` is the caller's skeleton (else rebuilt from the file).
    """
    if not isinstance(records, dict):
        raise fail(source, f"is corrupted: its manifest `modules` is not a JSON object, got {records!r}.")
    checked = []
    for name in sorted(records, key=lambda n: (n.count("."), n)):
        record = records[name]
        subject = f" for module {name!r}"
        if not (isinstance(name, str) and _MODULE_NAME.fullmatch(name)):
            raise fail(source, f"is corrupted: its module record name {name!r} is not a dotted attribute path.")
        if not isinstance(record, dict):
            raise fail(source, f"is corrupted: its record{subject} is not a JSON object.")
        module, qualname, args = record.get("module"), record.get("qualname"), record.get("args")
        if not _is_dotted(module) or not _is_dotted(qualname):
            raise fail(
                source, f"is corrupted: its recorded class {module!r}.{qualname!r}{subject} is not a dotted path."
            )
        if not isinstance(args, dict):
            why = record.get("not_rebuildable") or "no constructor arguments were recorded"
            raise fail(
                source,
                f"cannot rebuild module {name!r} ({module}.{qualname}) without a skeleton: {why}. HINT: build the model"
                " with that module in place yourself and pass it: load_compressed(path, model=...).",
            )
        _check_trusted(source, module, qualname, trusted, subject)
        checked.append((name, module, qualname, args))
    what = f"the {'given' if given else 'rebuilt'} {type(model).__name__}"
    swaps: dict[str, nn.Module] = {}
    for name, module, qualname, args in checked:
        cls = _import_module_class(source, module, qualname, f" for module {name!r}")
        outer = next((n for n in reversed(swaps) if name.startswith(f"{n}.")), None)  # a new module holds it
        try:  # raises unless every step of `name` is a submodule
            original = (
                model.get_submodule(name) if outer is None else swaps[outer].get_submodule(name[len(outer) + 1 :])
            )
        except AttributeError as err:
            raise fail(
                source,
                f"records module {name!r} ({module}.{qualname}), which {what} does not have ({err}); nothing was"
                " loaded. HINT: pass a skeleton of the saved model's class, built with its arguments: model=...",
            ) from None
        if type(original) is cls and isinstance(original, Rebuildable) and original.rebuild_args() == args:
            continue
        try:
            replacement = cls(**args)
        except Exception as err:
            raise fail(
                source,
                f"could not rebuild module {name!r} as {module}.{qualname}(**{args}): {type(err).__name__}: {err};"
                " nothing was loaded. HINT: pass a skeleton with model=...",
            ) from err
        _check_stands_in(source, f"module {name!r} ({module}.{qualname})", original, replacement, what)
        replacement = replacement.to(_device_of(original))
        if outer is None:
            swaps[name] = replacement
        else:
            place(swaps[outer], {name[len(outer) + 1 :]: replacement})
    return swaps


def _check_stands_in(source: Path, subject: str, original: nn.Module, replacement: nn.Module, what: str) -> None:
    """A recorded module that stands for a dense weight must replace a layer whose weight has that shape."""
    try:
        want = dense_weight_shape(replacement)
    except TypeError:
        return  # it stands for no weight: the check of the state dict against the file is all there is
    try:
        have = dense_weight_shape(original)
    except TypeError:
        raise fail(
            source,
            f"records {subject} in place of {what}'s {type(original).__name__}, which holds no weight it could stand"
            " for; nothing was loaded. HINT: pass a skeleton of the saved model's class, built with its arguments.",
        ) from None
    if tuple(have) != tuple(want):
        raise fail(
            source,
            f"records {subject} for a {list(want)} weight, but {what}'s {type(original).__name__} there has a"
            f" {list(have)} weight; nothing was loaded. HINT: pass a skeleton of the saved model's class, built with"
            " the arguments it was saved with.",
        )


def _device_of(module: nn.Module) -> torch.device:
    """Where ``module``'s tensors live (CPU when it has none, or only meta tensors)."""
    for tensor in (*module.parameters(), *module.buffers()):
        return torch.device("cpu") if tensor.is_meta else tensor.device
    return torch.device("cpu")


def _is_dotted(value: Any) -> bool:
    return isinstance(value, str) and _DOTTED.fullmatch(value) is not None


def _check_trusted(source: Path, module: str, qualname: str, trusted: tuple[str, ...], subject: str = "") -> None:
    class_path = f"{module}.{qualname}"
    if not any(class_path == prefix or class_path.startswith(prefix + ".") for prefix in trusted):
        top = module.split(".")[0]
        raise fail(
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
        raise fail(source, f"records the class {class_path}{subject}, which cannot be imported: {err}.") from err
    if not (isinstance(obj, type) and issubclass(obj, nn.Module)):
        raise fail(source, f"records {class_path}{subject}, which is not a torch.nn.Module subclass.")
    return obj
