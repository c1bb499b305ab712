"""The ``trainer`` section, typed by jsonargparse exactly as LightningCLI's parser types it.

LightningCLI adds the Trainer's arguments with ``add_class_arguments(Trainer, "trainer")``; the same parser here
decides which values fit (the Trainer's own arguments and each callback's ``init_args`` against its constructor).
Our part is only what jsonargparse does not do: naming the file, line and key of the value that does not fit, with
a HINT; and three deliberate differences, all towards refusing:

- a value written as a string in ``init_args`` stays a string (jsonargparse, made for command lines, would read
  ``'3'`` as 3 and ``'yes'`` as True; PyYAML leaves ``1e-3`` a string, which would then pass for a float);
- strings are never read as paths to further config files (``sub_configs=False``): such a file would escape these
  checks;
- anything a string resolves to (a class, a function) must come from the allowed packages.

A callback whose constructor takes ``**kwargs`` gets the names it does not list passed through unchecked, as
Python would; jsonargparse (and so LightningCLI) refuses them.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import re
import types
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from jsonargparse import ArgumentParser, Namespace

from lightning_compress._lightning import Callback, Trainer, submodule
from lightning_compress.recipes.classes import Allowed, is_allowed, trust_hint
from lightning_compress.recipes.errors import KeyPath, RecipeError, Source, alternatives, join, show
from lightning_compress.recipes.guard import guarded
from lightning_compress.recipes.layout import CALLBACKS_PATH
from lightning_compress.recipes.wording import describe, inner_annotation, suggest

__all__ = ["CallbackSpec", "check_arguments", "fits"]

_COERCED = (bool, int, float, type(None), list, tuple, dict, set)


@dataclass(frozen=True)
class CallbackSpec:
    """One ``trainer.callbacks`` entry: where it is, the class it names (imported, checked) and its raw arguments."""

    path: KeyPath
    cls: type[Callback]
    class_path: str
    init_args: Mapping[str, Any]


def check_arguments(source: Source, trainer: Mapping[str, Any], specs: list[CallbackSpec], allowed: Allowed) -> None:
    """Raise a :class:`RecipeError` for the first value in ``trainer`` that LightningCLI's parser would refuse."""
    for spec in specs:
        _check_names(source, spec)
    _trainer_parser()  # built before the guard: what the Trainer's own annotations import is not the recipe's doing
    guarded(source, trainer, allowed, lambda: _check_values(source, trainer, specs, allowed))


def _check_values(source: Source, trainer: Mapping[str, Any], specs: list[CallbackSpec], allowed: Allowed) -> None:
    section = {**trainer, "callbacks": [_entry(spec) for spec in specs]} if specs else dict(trainer)
    try:
        parsed = _parse(section)
    except Exception as err:  # noqa: BLE001 - jsonargparse's ArgumentError, or anything its checks raise on odd values
        raise _locate(source, trainer, specs, err) from err
    for where, raw, value in _pairs(trainer, parsed, ("trainer",)):
        _check_resolved(source, specs, allowed, where, raw, value)


def fits(value: object, annotation: Any) -> bool:
    """Whether jsonargparse accepts ``value`` for ``annotation`` (an annotation it cannot handle accepts anything)."""
    parser = _value_parser(annotation)
    if parser is None:
        return True
    try:
        parser.parse_object({"value": value})
    except Exception:  # noqa: BLE001 - any refusal, worded or not, is "does not fit"
        return False
    return True


# ---------------------------------------------------------------------------------------------------- parsing


@functools.cache
def _trainer_parser() -> ArgumentParser:
    parser = submodule("cli").LightningArgumentParser(exit_on_error=False)
    parser.add_class_arguments(Trainer, "trainer", fail_untyped=False, sub_configs=False)
    return parser


def _parse(section: Mapping[str, Any]) -> Namespace:
    return _trainer_parser().parse_object({"trainer": dict(section)}).trainer


def _value_parser(annotation: Any) -> ArgumentParser | None:
    try:
        return _cached_value_parser(annotation)
    except TypeError:  # an unhashable annotation
        return _build_value_parser(annotation)


@functools.lru_cache(maxsize=512)
def _cached_value_parser(annotation: Any) -> ArgumentParser | None:
    return _build_value_parser(annotation)


def _build_value_parser(annotation: Any) -> ArgumentParser | None:
    if annotation is inspect.Parameter.empty or annotation is Any:
        return None
    parser = ArgumentParser(exit_on_error=False)
    try:
        parser.add_argument("--value", type=annotation)
    except Exception:  # noqa: BLE001 - an annotation jsonargparse does not support: the constructor decides
        return None
    return parser


def _entry(spec: CallbackSpec) -> dict[str, Any]:
    named = _named_parameters(spec.cls)
    init_args = {k: v for k, v in spec.init_args.items() if named is None or k in named}
    return {"class_path": spec.class_path, "init_args": init_args}


# ---------------------------------------------------------------------------------------------------- names


def _check_names(source: Source, spec: CallbackSpec) -> None:
    """Unknown and missing argument names, worded with the valid ones (a ``**kwargs`` constructor takes any)."""
    named = _named_parameters(spec.cls)
    if named is None:  # no signature to check against: the constructor decides
        return
    accepts_any = any(p.kind is p.VAR_KEYWORD for p in inspect.signature(spec.cls).parameters.values())
    for name in spec.init_args:
        if name not in named and not accepts_any:
            close = difflib.get_close_matches(str(name), list(named), n=3)
            raise source.error(
                spec.path + ("init_args", name),
                f"{spec.cls.__name__} has no argument {name!r}; valid arguments: {join(named) or '(none)'}",
                f"did you mean {alternatives(close)}?" if close else None,
            )
    missing = [n for n, p in named.items() if p.default is p.empty and n not in spec.init_args]
    if missing:
        raise source.error(
            spec.path + ("init_args",) if spec.path + ("init_args",) in source.lines else spec.path,
            f"{spec.cls.__name__} requires argument(s) {join(missing)}, which `init_args` does not set",
            hint=f"add them, e.g. `init_args: {{{missing[0]}: ...}}`.",
        )


def _named_parameters(cls: type) -> dict[str, inspect.Parameter] | None:
    try:
        parameters = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        return None
    return {n: p for n, p in parameters.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


@functools.cache
def _annotations(cls: type) -> dict[str, Any]:
    """Resolved annotations of ``cls.__init__``; a parameter whose annotation cannot be resolved is ``Any``."""
    try:
        return typing.get_type_hints(cls.__init__)
    except Exception:  # noqa: BLE001 - any failure to resolve means "unknown", which the messages word as any value
        parameters = (_named_parameters(cls) or {}).values()
        return {p.name: (Any if isinstance(p.annotation, str) else p.annotation) for p in parameters}


# ---------------------------------------------------------------------------------------------------- locating


def _locate(source: Source, trainer: Mapping[str, Any], specs: list[CallbackSpec], err: Exception) -> RecipeError:
    """The first value (in the file's order) that the parser refuses on its own, worded; else the parser's words."""
    for name, value in trainer.items():
        if name == "callbacks":
            for spec in specs:
                found = _locate_callback(source, spec)
                if found is not None:
                    return found
        elif not _parses({name: value}):
            annotation = _annotations(Trainer).get(name, Any)
            said = f"; LightningCLI's parser says: {_summary(err)}" if isinstance(value, (dict, list)) else ""
            return source.error(
                ("trainer", name),
                f"Trainer argument `{name}` expects {describe(annotation)}, got {show(value)}{said}",
                suggest(value, annotation, fits),
            )
    return source.error(("trainer",), f"LightningCLI's parser refuses the `trainer` section: {_summary(err)}")


def _locate_callback(source: Source, spec: CallbackSpec) -> RecipeError | None:
    try:
        _parse({"callbacks": [_entry(spec)]})
    except Exception as err:  # noqa: BLE001 - see check_arguments
        annotations = _annotations(spec.cls)
        for name, value in _entry(spec)["init_args"].items():
            found = _first_mismatch(value, annotations.get(name, Any), ())
            if found is not None:
                where, annotation, bad = found
                return _argument_error(source, spec, name, where, annotation, bad)
        return source.error(spec.path, f"LightningCLI's parser refuses this callback: {_summary(err)}")
    return None


def _parses(section: Mapping[str, Any]) -> bool:
    try:
        _parse(section)
    except Exception:  # noqa: BLE001 - see check_arguments
        return False
    return True


def _first_mismatch(value: object, annotation: Any, where: KeyPath) -> tuple[KeyPath, Any, object] | None:
    if fits(value, annotation):
        return None
    for step, item, item_annotation in inner_annotation(annotation, value):
        found = _first_mismatch(item, item_annotation, where + (step,))
        if found is not None:
            return found
    return where, annotation, value


def _argument_error(
    source: Source, spec: CallbackSpec, name: str, where: KeyPath, annotation: Any, value: object
) -> RecipeError:
    path = spec.path + ("init_args", name) + where
    item = "".join(f"[{part!r}]" for part in where)
    written = source.texts.get(path)
    hint = suggest(value, annotation, fits)
    if written is not None and ":" in written and isinstance(value, int):
        hint = f"YAML 1.1 reads {written} as the base-60 number {value}; quote it: '{written}'."
    return source.error(
        path,
        f"{spec.cls.__name__} argument `{name}`{item and f' item {item}'} expects {describe(annotation)}, "
        f"got {show(value)}",
        hint,
    )


def _summary(err: Exception) -> str:
    """jsonargparse's message on one line: the part about the given class_path when there is one."""
    lines = str(err).splitlines()
    start = next((i for i, line in enumerate(lines) if "Problem with given class_path" in line), None)
    if start is not None:
        indent = len(lines[start]) - len(lines[start].lstrip())
        end = next(
            (i for i in range(start + 1, len(lines)) if len(lines[i]) - len(lines[i].lstrip()) <= indent), len(lines)
        )
        lines = [lines[start].strip().removeprefix("- ")] + lines[start + 1 : end]
    text = re.sub(r"\s+", " ", " ".join(line.strip() for line in lines)).strip()
    return text if len(text) <= 300 else f"{text[:297]}..."


# ---------------------------------------------------------------------------------------------------- after parsing


def _pairs(raw: object, parsed: object, where: KeyPath) -> Iterator[tuple[KeyPath, object, object]]:
    """``(where, raw value, parsed value)`` for each value written in the recipe, descending into both together."""
    if isinstance(raw, dict) and isinstance(parsed, (dict, Namespace)):
        for key, child in raw.items():
            if isinstance(key, str) and key in parsed:
                yield from _pairs(child, parsed[key], where + (key,))
    elif isinstance(raw, list) and isinstance(parsed, list) and len(raw) == len(parsed):
        for index, (child, parsed_child) in enumerate(zip(raw, parsed, strict=True)):
            yield from _pairs(child, parsed_child, where + (index,))
    else:
        yield where, raw, parsed


def _check_resolved(
    source: Source, specs: list[CallbackSpec], allowed: Allowed, where: KeyPath, raw: object, value: object
) -> None:
    """A string that jsonargparse turned into something else: a number (refused in ``init_args``) or an import."""
    if not isinstance(raw, str) or isinstance(value, str):
        return
    if isinstance(value, _COERCED) and where[:2] == CALLBACKS_PATH and len(where) > 4 and where[3] == "init_args":
        spec = next(s for s in specs if s.path == where[:3])
        name, rest = str(where[4]), where[5:]
        annotation, item = _annotations(spec.cls).get(name, Any), spec.init_args[name]
        for step in rest:
            annotation = next((a for s, _, a in inner_annotation(annotation, item) if s == step), Any)
            item = item[step]  # type: ignore[index]
        raise _argument_error(source, spec, name, rest, annotation, raw)
    imported = isinstance(value, (Namespace, type, types.ModuleType)) or callable(value)
    if imported and "." in raw and not is_allowed(raw, allowed.anywhere):
        raise source.error(
            where,
            f"{raw!r} names something outside the allowed packages ({join(allowed.anywhere)}); a recipe may name "
            "classes and functions from those only",
            hint=trust_hint(raw),
        )
