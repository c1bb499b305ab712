"""Rebuilding a model from its file alone: trusted prefixes, guarded imports, the model and its recorded modules.

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

from torch import nn

from lightning_compress.export.errors import fail
from lightning_compress.export.manifest import BUILTIN_TRUSTED_PREFIX

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


def replace_modules(source: Path, records: Any, model: nn.Module, trusted: tuple[str, ...]) -> None:
    """Put ``cls(**args)`` at every name ``records`` (the manifest's ``modules``) lists, in the rebuilt ``model``.

    Every record is validated and trusted before anything is imported; parents are replaced before their children.
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
    for name, module, qualname, args in checked:
        cls = _import_module_class(source, module, qualname, f" for module {name!r}")
        parent_name, _, child = name.rpartition(".")
        try:
            model.get_submodule(name)  # raises unless every step of `name` is a submodule
        except AttributeError as err:
            raise fail(
                source,
                f"records module {name!r} ({module}.{qualname}), which the rebuilt {type(model).__name__} does not"
                f" have ({err}); nothing was loaded. HINT: pass a skeleton with model=...",
            ) from None
        try:
            replacement = cls(**args)
        except Exception as err:
            raise fail(
                source,
                f"could not rebuild module {name!r} as {module}.{qualname}(**{args}): {type(err).__name__}: {err};"
                " nothing was loaded. HINT: pass a skeleton with model=...",
            ) from err
        setattr(model.get_submodule(parent_name), child, replacement)


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
