"""What jsonargparse may import while it checks a recipe: nothing that the recipe names outside the allow-list.

jsonargparse imports a dotted string wherever the annotation takes a class, a callable, a type or a module (a logger
given as ``"pkg.Logger"``, a Callable argument given as ``"pkg.fn"``). Every ``class_path`` has been checked as text
before; for the other strings, :func:`guarded` puts a finder at the front of ``sys.meta_path`` for the duration of
the check that refuses to import a module named by any dotted string of the recipe outside the allowed packages.
What the recipe does not name (the modules an allowed class's annotations need) imports as usual. The finder is
process-wide while it is in place: another thread importing one of those names at that moment is refused too.
"""

from __future__ import annotations

import importlib.abc
import sys
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from lightning_compress.recipes.classes import Allowed, is_allowed, is_dotted_name, require_allowed, trust_hint
from lightning_compress.recipes.errors import KeyPath, Source, join, show
from lightning_compress.recipes.layout import values_in

__all__ = ["check_class_paths", "guarded"]

T = TypeVar("T")


def check_class_paths(source: Source, trainer: Mapping[str, Any], allowed: Allowed, skip: set[KeyPath]) -> None:
    """Every ``class_path`` inside ``trainer`` (except the callback entries at ``skip``), checked as text."""
    for path, value in values_in(source, ("trainer",), trainer):
        if not isinstance(value, dict) or "class_path" not in value or path in skip:
            continue
        class_path = value["class_path"]
        if not is_dotted_name(class_path):
            raise source.error(
                path + ("class_path",),
                f"`class_path` must be a dotted Python name like 'package.module.Class', got {show(class_path)}",
            )
        if "." in class_path:
            require_allowed(source, path + ("class_path",), class_path, allowed.anywhere)


def guarded(source: Source, trainer: Mapping[str, Any], allowed: Allowed, check: Callable[[], T]) -> T:
    """``check()``, with the modules named by ``trainer``'s dotted strings outside ``allowed`` refused."""
    refused: dict[str, tuple[KeyPath, str]] = {}
    for path, value in values_in(source, ("trainer",), trainer):
        if is_dotted_name(value) and "." in value and not is_allowed(value, allowed.anywhere):
            parts = value.split(".")
            for end in range(1, len(parts) + 1):
                refused.setdefault(".".join(parts[:end]), (path, value))
    finder = _RefuseImports({name for name in refused if name not in sys.modules})
    sys.meta_path.insert(0, finder)
    try:
        return check()
    finally:
        sys.meta_path.remove(finder)
        if finder.hits:
            path, value = refused[finder.hits[0]]
            raise source.error(
                path,
                f"{value!r} names something outside the allowed packages ({join(allowed.anywhere)}), which "
                "LightningCLI would import; it was not imported",
                hint=trust_hint(value),
            )


class _RefuseImports(importlib.abc.MetaPathFinder):
    def __init__(self, refused: set[str]) -> None:
        self.refused = refused
        self.hits: list[str] = []

    def find_spec(self, fullname: str, path: object = None, target: object = None) -> None:
        if fullname in self.refused:
            self.hits.append(fullname)
            raise ModuleNotFoundError(
                f"importing {fullname!r} is refused (outside the allowed packages)", name=fullname
            )
        return None
