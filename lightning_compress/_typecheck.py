"""Check a value read from YAML against a constructor's type annotation, before anything is called.

Only what YAML can express is checked: ``bool``, ``int``, ``float``, ``str``, ``None``, ``Literal``, unions
(``Optional``, ``Union``, ``X | Y``), lists/tuples/sequences/sets with their items, dicts/mappings with their keys
and values, paths and enums. Any other annotation (``timedelta``, ``torch.device``, a class, a ``Callable``, ``Any``,
an annotation that cannot be resolved) is accepted here and left to the constructor, whose errors the caller reports.
"""

from __future__ import annotations

import collections.abc as abc
import difflib
import enum
import inspect
import os
import pathlib
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal, Union

__all__ = ["Mismatch", "check", "describe", "init_type_hints", "suggest"]

_SEQUENCES = frozenset({list, tuple, abc.Sequence, abc.MutableSequence, abc.Iterable, abc.Collection})
_SETS = frozenset({set, frozenset, abc.Set, abc.MutableSet})
_MAPPINGS = frozenset({dict, abc.Mapping, abc.MutableMapping})
_SCALARS: dict[type, typing.Callable[[object], bool]] = {
    bool: lambda v: isinstance(v, bool),
    int: lambda v: isinstance(v, int) and not isinstance(v, bool),
    float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    str: lambda v: isinstance(v, str),
}
_NAMES = {type(None): "null", bool: "bool", int: "int", float: "float", str: "str"}


@dataclass(frozen=True)
class Mismatch:
    """``value`` (found at ``where`` inside the checked value: list indices and dict keys) is not a ``annotation``."""

    where: tuple[object, ...]
    annotation: Any
    value: object

    @property
    def expected(self) -> str:
        return describe(self.annotation)


def init_type_hints(cls: type) -> dict[str, Any]:
    """Resolved annotations of ``cls.__init__`` (strings from ``from __future__ import annotations`` included).

    When some annotation cannot be resolved, every parameter whose annotation is still a string is treated as ``Any``.
    """
    init = getattr(cls, "__init__", None)
    try:
        return typing.get_type_hints(init)
    except Exception:  # noqa: BLE001 - any failure to resolve means "unknown", which is accepted
        try:
            parameters = inspect.signature(init).parameters.values()
        except (TypeError, ValueError):
            return {}
        return {p.name: (Any if isinstance(p.annotation, str) else p.annotation) for p in parameters}


def check(value: object, annotation: Any) -> Mismatch | None:
    """Return ``None`` when ``value`` fits ``annotation`` (or the annotation is unknown), else the first mismatch."""
    annotation = _strip_annotated(annotation)
    origin = typing.get_origin(annotation)
    if origin is Union or origin is types.UnionType:
        return _check_union(value, annotation)
    if origin is Literal:
        return _check_literal(value, annotation)
    if annotation is None or annotation is type(None):
        return None if value is None else Mismatch((), type(None), value)
    if annotation in _SCALARS:
        return None if _SCALARS[annotation](value) else Mismatch((), annotation, value)
    container = origin if origin is not None else annotation
    if _hashable_in(container, _SEQUENCES | _SETS):
        return _check_sequence(value, annotation, container)
    if _hashable_in(container, _MAPPINGS):
        return _check_mapping(value, annotation)
    if _is_path_type(container):
        return None if isinstance(value, (str, os.PathLike)) else Mismatch((), annotation, value)
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return None if _enum_accepts(annotation, value) else Mismatch((), annotation, value)
    return None


def describe(annotation: Any) -> str:
    """A short, YAML-minded name for what an annotation accepts: ``int``, ``'min' | 'max'``, ``list[str] | null``."""
    annotation = _strip_annotated(annotation)
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is Union or origin is types.UnionType:
        return " | ".join(dict.fromkeys(describe(arg) for arg in args))
    if origin is Literal:
        return " | ".join(_show(arg) for arg in args)
    if annotation is None or annotation in _NAMES:
        return _NAMES[type(None) if annotation is None else annotation]
    container = origin if origin is not None else annotation
    if _hashable_in(container, _SEQUENCES | _SETS):
        return _describe_sequence(container, args)
    if _hashable_in(container, _MAPPINGS):
        return f"dict[{describe(args[0])}, {describe(args[1])}]" if len(args) == 2 else "dict"
    if _is_path_type(container):
        return "path (str)"
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return " | ".join(_show(member.value) for member in annotation)
    if annotation is Any or annotation is inspect.Parameter.empty:
        return "any value"
    return getattr(annotation, "__name__", None) or str(annotation)


def suggest(mismatch: Mismatch) -> str | None:
    """A HINT for the usual slips behind a mismatch (quoting, YAML 1.1 number syntax, typos in a choice)."""
    value, annotation = mismatch.value, _strip_annotated(mismatch.annotation)
    choices = _choices(annotation)
    if choices and isinstance(value, str):
        close = difflib.get_close_matches(value, [c for c in choices if isinstance(c, str)], n=1)
        if close:
            return f"did you mean {close[0]!r}?"
    if isinstance(value, str) and value.strip().lower() in {"none", "null", "~"} and check(None, annotation) is None:
        return "write null without quotes (or leave the value empty) for None."
    if isinstance(value, bool) and _accepts_number(annotation):
        return "true/false are booleans; write a number."
    if isinstance(value, str) and _accepts_number(annotation) and _parses_as_number(value):
        return _number_hint(value)
    if isinstance(value, str) and value.strip().lower() in {"true", "false"} and check(True, annotation) is None:
        return "write true or false without quotes."
    if isinstance(value, str) and check([value], annotation) is None:
        return f"write a list, e.g. [{value!r}]."
    if not isinstance(value, str) and check(str(value), annotation) is None and not isinstance(value, (list, dict)):
        return f"quote the value to pass it as a string, e.g. '{value}'."
    return None


def _check_union(value: object, annotation: Any) -> Mismatch | None:
    members = typing.get_args(annotation)
    mismatches = [check(value, member) for member in members]
    if any(m is None for m in mismatches):
        return None
    non_null = [(member, m) for member, m in zip(members, mismatches, strict=True) if member is not type(None)]
    if len(non_null) == 1 and non_null[0][1] is not None and non_null[0][1].where:
        return non_null[0][1]  # e.g. Optional[list[int]] given [1, "a"]: point at the bad item
    return Mismatch((), annotation, value)


def _check_literal(value: object, annotation: Any) -> Mismatch | None:
    ok = any(value == choice and type(value) is type(choice) for choice in typing.get_args(annotation))
    return None if ok else Mismatch((), annotation, value)


def _check_sequence(value: object, annotation: Any, container: Any) -> Mismatch | None:
    allowed: tuple[type, ...] = (list, tuple, set, frozenset) if container in _SETS else (list, tuple)
    if not isinstance(value, allowed):
        return Mismatch((), annotation, value)
    args = typing.get_args(annotation)
    if container is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
        if args == ((),) or len(args) != len(value):  # tuple[()] or a fixed-length tuple
            return Mismatch((), annotation, value)
        return _first(((index,), item, arg) for index, (item, arg) in enumerate(zip(value, args, strict=True)))
    item_type = args[0] if args else Any
    items = sorted(value, key=repr) if isinstance(value, (set, frozenset)) else value
    return _first(((index,), item, item_type) for index, item in enumerate(items))


def _check_mapping(value: object, annotation: Any) -> Mismatch | None:
    if not isinstance(value, dict):
        return Mismatch((), annotation, value)
    args = typing.get_args(annotation)
    if len(args) != 2:
        return None
    key_type, value_type = args
    for key, item in value.items():
        if check(key, key_type) is not None:
            return Mismatch((key,), key_type, key)
        found = _first([((key,), item, value_type)])
        if found is not None:
            return found
    return None


def _first(checks: typing.Iterable[tuple[tuple[object, ...], object, Any]]) -> Mismatch | None:
    """The first failing ``(where, value, annotation)`` check, with ``where`` prefixed to the nested position."""
    for where, item, item_type in checks:
        found = check(item, item_type)
        if found is not None:
            return Mismatch(where + found.where, found.annotation, found.value)
    return None


def _describe_sequence(container: Any, args: tuple[Any, ...]) -> str:
    name = "set" if container in _SETS else "list"
    if container is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
        return f"list of {len(args)} items [{', '.join(describe(arg) for arg in args)}]"
    return f"{name}[{describe(args[0])}]" if args else name


def _strip_annotated(annotation: Any) -> Any:
    while typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    return annotation


def _hashable_in(candidate: Any, group: frozenset[Any]) -> bool:
    try:
        return candidate in group
    except TypeError:
        return False


def _is_path_type(annotation: Any) -> bool:
    if annotation is os.PathLike:
        return True
    return isinstance(annotation, type) and issubclass(annotation, pathlib.PurePath)


def _enum_accepts(enum_type: type[enum.Enum], value: object) -> bool:
    return any(value is member or value == member.value for member in enum_type)


def _choices(annotation: Any) -> list[object]:
    """The finite set of values an annotation allows (Literal/Enum members, also inside unions), else ``[]``."""
    origin = typing.get_origin(annotation)
    if origin is Union or origin is types.UnionType:
        return [choice for arg in typing.get_args(annotation) for choice in _choices(_strip_annotated(arg))]
    if origin is Literal:
        return list(typing.get_args(annotation))
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return [member.value for member in annotation]
    return []


def _accepts_number(annotation: Any) -> bool:
    return check(1, annotation) is None or check(1.5, annotation) is None


def _parses_as_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _number_hint(text: str) -> str:
    mantissa, has_exponent, exponent = text.strip().lower().partition("e")
    if not has_exponent:
        return "remove the quotes to pass a number."
    mantissa = mantissa if "." in mantissa else f"{mantissa}.0"
    exponent = exponent if exponent.startswith(("+", "-")) else f"+{exponent}"
    return (
        f"PyYAML (YAML 1.1) reads {text!r} as a string: a float needs a dot in the mantissa and a sign in the "
        f"exponent, e.g. {mantissa}e{exponent}."
    )


def _show(value: object) -> str:
    return "null" if value is None else repr(value)
