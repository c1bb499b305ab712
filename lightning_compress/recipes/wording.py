"""How a type annotation reads in a message (``int``, ``'min' | 'max'``, ``list[str] | null``), and the HINTs for
the usual slips behind a value that does not fit one (quoting, YAML 1.1 number syntax, a typo in a choice).

Whether a value fits is jsonargparse's decision, passed in as ``fits``; this module only words it.
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
from collections.abc import Callable
from typing import Any, Literal, Union

__all__ = ["describe", "inner_annotation", "suggest"]

Fits = Callable[[object, Any], bool]
_SEQUENCES = (list, tuple, set, frozenset, abc.Sequence, abc.MutableSequence, abc.Iterable, abc.Collection, abc.Set)
_MAPPINGS = (dict, abc.Mapping, abc.MutableMapping)
_NAMES = {type(None): "null", bool: "bool", int: "int", float: "float", str: "str"}


def describe(annotation: Any) -> str:
    """A short, YAML-minded name for what an annotation accepts."""
    annotation = _strip_annotated(annotation)
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is Union or origin is types.UnionType:
        return " | ".join(dict.fromkeys(describe(arg) for arg in args))
    if origin is Literal:
        return " | ".join("null" if arg is None else repr(arg) for arg in args)
    if annotation is None or annotation in _NAMES:
        return _NAMES[type(None) if annotation is None else annotation]
    container = origin if origin is not None else annotation
    if _is_one_of(container, _SEQUENCES):
        name = "set" if _is_one_of(container, (set, frozenset, abc.Set)) else "list"
        if container is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            return f"list of {len(args)} items [{', '.join(describe(arg) for arg in args)}]"
        return f"{name}[{describe(args[0])}]" if args else name
    if _is_one_of(container, _MAPPINGS):
        return f"dict[{describe(args[0])}, {describe(args[1])}]" if len(args) == 2 else "dict"
    if container is os.PathLike or (isinstance(container, type) and issubclass(container, pathlib.PurePath)):
        return "path (str)"
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return " | ".join(repr(member.value) for member in annotation)
    if annotation is Any or annotation is inspect.Parameter.empty:
        return "any value"
    return getattr(annotation, "__name__", None) or str(annotation)


def inner_annotation(annotation: Any, value: object) -> list[tuple[object, object, Any]]:
    """``(where, item, item annotation)`` for the items of a container ``value`` under its one container annotation.

    Used to point at the bad item of ``Optional[list[int]]`` given ``[1, "a"]``. ``[]`` when there is no single
    container type to descend into.
    """
    annotation = _strip_annotated(annotation)
    members = _union_members(annotation)
    non_null = [m for m in members if m is not type(None)]
    if len(non_null) != 1:
        return []
    container_type = non_null[0]
    container, args = typing.get_origin(container_type) or container_type, typing.get_args(container_type)
    if isinstance(value, (list, tuple)) and _is_one_of(container, _SEQUENCES):
        if container is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            return [
                (i, item, arg) for i, (item, arg) in enumerate(zip(value, args, strict=False))
            ]  # a length mismatch is refused whole
        return [(i, item, args[0] if args else Any) for i, item in enumerate(value)]
    if isinstance(value, dict) and _is_one_of(container, _MAPPINGS) and len(args) == 2:
        return [(key, item, args[1]) for key, item in value.items()]
    return []


def suggest(value: object, annotation: Any, fits: Fits) -> str | None:
    """A HINT for ``value``, which does not fit ``annotation``."""
    annotation = _strip_annotated(annotation)
    choices = _choices(annotation)
    if choices and isinstance(value, str):
        close = difflib.get_close_matches(value, [c for c in choices if isinstance(c, str)], n=1)
        if close:
            return f"did you mean {close[0]!r}?"
    number = fits(1, annotation) or fits(1.5, annotation)
    if isinstance(value, str) and value.strip().lower() in {"none", "null", "~"} and fits(None, annotation):
        return "write null without quotes (or leave the value empty) for None."
    if isinstance(value, bool) and number:
        return "true/false are booleans; write a number."
    if isinstance(value, str) and number and _parses_as_number(value):
        return _number_hint(value)
    if isinstance(value, str) and value.strip().lower() in {"true", "false"} and fits(True, annotation):
        return "write true or false without quotes."
    if isinstance(value, str) and fits([value], annotation):
        return f"write a list, e.g. [{value!r}]."
    if isinstance(value, (int, float)) and not isinstance(value, bool) and fits(str(value), annotation):
        return f"quote the value to pass it as a string, e.g. '{value}'."
    return None


def _union_members(annotation: Any) -> tuple[Any, ...]:
    origin = typing.get_origin(annotation)
    if origin is Union or origin is types.UnionType:
        return tuple(_strip_annotated(arg) for arg in typing.get_args(annotation))
    return (annotation,)


def _choices(annotation: Any) -> list[object]:
    """The finite set of values an annotation allows (Literal/Enum members, also inside unions), else ``[]``."""
    found: list[object] = []
    for member in _union_members(annotation):
        if typing.get_origin(member) is Literal:
            found.extend(typing.get_args(member))
        elif isinstance(member, type) and issubclass(member, enum.Enum):
            found.extend(item.value for item in member)
    return found


def _strip_annotated(annotation: Any) -> Any:
    while typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    return annotation


def _is_one_of(candidate: Any, group: tuple[Any, ...]) -> bool:
    try:
        return candidate in group
    except TypeError:
        return False


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
