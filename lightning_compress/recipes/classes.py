"""Which classes a recipe may name, checked as text before anything is imported, and then resolved.

A callback's ``class_path`` must start with an allowed prefix (``lightning_compress.``, Lightning's
``<namespace>.callbacks.``, plus the caller's ``extra_allowed_prefixes``); a name without dots is one of the public
callbacks those packages export. Any other class or callable named inside ``trainer`` (a logger, a profiler, a
Callable argument) may also come from Lightning's own namespace. No part of a path may be private (``_x``).
"""

from __future__ import annotations

import difflib
import importlib
import types
from collections.abc import Sequence
from dataclasses import dataclass

from lightning_compress._lightning import Callback, pl
from lightning_compress.recipes.errors import KeyPath, Source, alternatives, join

__all__ = [
    "ALLOWED_PREFIXES",
    "Allowed",
    "allowed_prefixes",
    "is_allowed",
    "is_dotted_name",
    "callback_path",
    "import_callback",
    "require_allowed",
    "trust_hint",
]

#: Class paths a recipe may always name as callbacks (Lightning's namespace is the one chosen in ``_lightning``).
ALLOWED_PREFIXES: tuple[str, ...] = ("lightning_compress.", f"{pl.__name__}.callbacks.")
_MISSING = object()


@dataclass(frozen=True)
class Allowed:
    """The prefixes a recipe may name: ``callbacks`` for ``trainer.callbacks`` entries, ``anywhere`` elsewhere."""

    callbacks: tuple[str, ...]
    anywhere: tuple[str, ...]

    @classmethod
    def with_extra(cls, extra: Sequence[str]) -> Allowed:
        callbacks = allowed_prefixes(extra)
        return cls(callbacks, callbacks + (f"{pl.__name__}.",))


def is_allowed(full_path: str, prefixes: tuple[str, ...]) -> bool:
    """Whether ``full_path`` starts with one of ``prefixes`` (whole dotted components) and has no private part."""
    public = not any(part.startswith("_") for part in full_path.split("."))
    return public and any(full_path.startswith(prefix) or full_path == prefix[:-1] for prefix in prefixes)


def allowed_prefixes(extra: Sequence[str]) -> tuple[str, ...]:
    if isinstance(extra, str):
        raise TypeError(f"`extra_allowed_prefixes` takes a sequence of prefixes such as [{extra!r}], not one string")
    for prefix in extra:
        if not isinstance(prefix, str) or not prefix.strip("."):
            raise ValueError(f"`extra_allowed_prefixes` holds {prefix!r}; each must be a package prefix like 'my_pkg.'")
    return ALLOWED_PREFIXES + tuple(p if p.endswith(".") else f"{p}." for p in extra)


def is_dotted_name(text: object) -> bool:
    return isinstance(text, str) and bool(text) and all(part.isidentifier() for part in text.split("."))


def callback_path(source: Source, path: KeyPath, class_path: str, prefixes: tuple[str, ...]) -> str:
    """A callback entry's ``class_path``, checked as text and fully qualified; nothing is imported."""
    if not is_dotted_name(class_path):
        raise source.error(path, f"`class_path` {class_path!r} is not a dotted Python name like 'package.module.Class'")
    full_path = class_path if "." in class_path else _expand_short_name(source, path, class_path)
    require_allowed(source, path, full_path, prefixes)
    return full_path


def import_callback(source: Source, path: KeyPath, full_path: str) -> type:
    """Import the allowed ``full_path`` and check that it names a Callback class (which is not called)."""
    return _require_callback_class(source, path, full_path, _import_object(source, path, full_path))


def trust_hint(full_path: str) -> str:
    package = full_path.split(".")[0]
    return f"If you trust `{package}`, allow it with load_recipe(..., extra_allowed_prefixes=['{package}.'])."


def require_allowed(source: Source, path: KeyPath, full_path: str, prefixes: tuple[str, ...]) -> None:
    """Refuse ``full_path`` unless it starts with one of ``prefixes`` and has no private part; nothing is imported."""
    if not any(full_path.startswith(prefix) or full_path == prefix[:-1] for prefix in prefixes):
        close = _close_known_paths(full_path, [], cutoff=0.8)
        trust = trust_hint(full_path)
        hint = f"did you mean {alternatives(close)}? Otherwise, i{trust[1:]}" if close else trust
        raise source.error(
            path, f"class {full_path!r} is outside the allowed packages ({join(prefixes)}); it was not imported", hint
        )
    private = [part for part in full_path.split(".") if part.startswith("_")]
    if private:
        close = _close_known_paths(full_path, [], cutoff=0.8)
        raise source.error(
            path,
            f"class path {full_path!r} has private part(s) {join(private)}; a recipe may name public classes only",
            hint=f"did you mean {alternatives(close)}?" if close else None,
        )


def _short_names() -> dict[str, tuple[str, ...]]:
    """Short name -> full paths, over the public Callback classes of lightning_compress and Lightning's callbacks."""
    found: dict[str, list[str]] = {}
    for module_name in ("lightning_compress", f"{pl.__name__}.callbacks"):
        module = importlib.import_module(module_name)
        for name in getattr(module, "__all__", ()):
            if _is_callback_class(getattr(module, name, None)):
                found.setdefault(name, []).append(f"{module_name}.{name}")
    return {name: tuple(paths) for name, paths in found.items()}


def _expand_short_name(source: Source, path: KeyPath, name: str) -> str:
    known = _short_names()
    matches = known.get(name, ())
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise source.error(path, f"the short name {name!r} is ambiguous: {join(matches)}", "write the full class path.")
    close = difflib.get_close_matches(name, list(known), n=3)
    raise source.error(
        path,
        f"unknown callback class {name!r}; a name without dots must be one of: {join(sorted(known))}",
        f"did you mean {alternatives(close)}?" if close else "write the full class path, e.g. 'my_pkg.MyCallback'.",
    )


def _import_object(source: Source, path: KeyPath, full_path: str) -> object:
    """Import the longest importable module prefix of ``full_path`` and walk the rest as attributes."""
    parts = full_path.split(".")
    for split in range(len(parts) - 1, 0, -1):
        module = _import_module(source, path, ".".join(parts[:split]))
        if module is not None:
            return _walk_attributes(source, path, full_path, module, parts[split:])
    raise _unknown_class(source, path, full_path, f"no module {parts[0]!r}", None)


def _import_module(source: Source, path: KeyPath, module_name: str) -> types.ModuleType | None:
    """The module, or ``None`` when it does not exist. Errors raised inside an existing module are reported."""
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name and (module_name == err.name or module_name.startswith(f"{err.name}.")):
            return None
        raise source.error(path, f"importing {module_name!r} failed: {type(err).__name__}: {err}") from err
    except Exception as err:  # noqa: BLE001 - any failure inside an allowed module is the recipe's error to report
        raise source.error(path, f"importing {module_name!r} failed: {type(err).__name__}: {err}") from err


def _walk_attributes(
    source: Source, path: KeyPath, full_path: str, module: types.ModuleType, names: Sequence[str]
) -> object:
    found: object = module
    for name in names:
        owner, found = found, getattr(found, name, _MISSING)
        if found is _MISSING:
            raise _unknown_class(source, path, full_path, f"{_name_of(owner)!r} has no attribute {name!r}", module)
        if isinstance(found, types.ModuleType):
            raise source.error(
                path,
                f"{full_path!r} passes through the module {found.__name__!r}, which {_name_of(owner)!r} imports; "
                "a class path must name a class in the module that defines or exports it",
            )
    return found


def _unknown_class(
    source: Source, path: KeyPath, full_path: str, reason: str, module: types.ModuleType | None
) -> Exception:
    extra = [f"{module.__name__}.{n}" for n in dir(module) if not n.startswith("_")] if module else []
    close = _close_known_paths(full_path, [p for p in extra if _is_callback_class(getattr(module, p.rsplit(".")[-1]))])
    return source.error(
        path,
        f"unknown callback class {full_path!r} ({reason}); known callbacks: {join(sorted(_short_names()))}",
        f"did you mean {alternatives(close)}?" if close else None,
    )


def _require_callback_class(source: Source, path: KeyPath, full_path: str, found: object) -> type:
    if not isinstance(found, type):
        raise source.error(
            path,
            f"{full_path!r} is a {type(found).__name__}, not a class; a recipe names Callback classes only "
            "(it was not called)",
        )
    if not issubclass(found, Callback):
        other = any(base.__name__ == "Callback" for base in found.__mro__)
        raise source.error(
            path,
            f"{full_path!r} is not a Lightning Callback (a subclass of {pl.__name__}.Callback); it was not "
            "instantiated",
            hint=f"this project runs on `{pl.__name__}`; use the callback from that namespace." if other else None,
        )
    return found


def _close_known_paths(full_path: str, extra: Sequence[str], cutoff: float = 0.6) -> list[str]:
    """Known callback paths whose class name is close to the last part of ``full_path``."""
    by_name: dict[str, list[str]] = {}
    for candidate in [p for paths in _short_names().values() for p in paths] + list(extra):
        by_name.setdefault(candidate.rsplit(".", 1)[-1], []).append(candidate)
    wanted = full_path.rsplit(".", 1)[-1].lstrip("_")
    close = difflib.get_close_matches(wanted, list(by_name), n=2, cutoff=cutoff)
    return list(dict.fromkeys(p for name in close for p in by_name[name]))


def _is_callback_class(found: object) -> bool:
    return isinstance(found, type) and issubclass(found, Callback)


def _name_of(owner: object) -> str:
    return getattr(owner, "__qualname__", None) or getattr(owner, "__name__", None) or type(owner).__name__
