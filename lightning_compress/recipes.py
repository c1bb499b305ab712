"""Recipes: LightningCLI-format YAML files whose ``trainer.callbacks`` become Callback instances.

The same file works two ways::

    callbacks = load_recipe("recipes/prune_resnet.yaml")          # Python: a list of callbacks
    lightning-compress fit --config recipes/prune_resnet.yaml     # CLI: a whole run

A recipe is untrusted input, so it is read in this order and nothing from it is imported or called early:

1. ``yaml.SafeLoader`` builds plain data only (``!!python/...`` tags are refused);
2. the shape is checked: top-level keys, ``trainer`` a mapping, ``trainer.callbacks`` a list of
   ``{class_path, init_args}`` entries;
3. every ``class_path`` is checked against the allow-list *before* any import (``lightning_compress.``,
   ``pytorch_lightning.callbacks.``, plus ``extra_allowed_prefixes``; short names resolve against the public
   callbacks of both); private components (``_x``) are refused;
4. the imported object must be a class that subclasses ``Callback`` (it is never called otherwise);
5. ``init_args`` are checked against the constructor's signature and annotations;
6. only then are the callbacks built, and a constructor's exception is reported with the file, line and class.

Every failure is a :class:`RecipeError` whose message names the file, the line, the key path, the bad value,
what would be valid and, where one helps, a ``HINT:``::

    recipe.yaml, line 6, `trainer.callbacks[0].init_args.patience`: EarlyStopping argument `patience` expects int,
    got 'three' (str).
"""

from __future__ import annotations

import copy
import difflib
import importlib
import inspect
import os
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lightning_compress import _typecheck
from lightning_compress._lightning import Callback, pl

__all__ = [
    "ALLOWED_PREFIXES",
    "ENTRY_KEYS",
    "TOP_LEVEL_KEYS",
    "RecipeError",
    "load_recipe",
    "validate_recipe_file",
]

#: Top-level keys of a LightningCLI ``fit`` config.
TOP_LEVEL_KEYS: tuple[str, ...] = (
    "seed_everything",
    "trainer",
    "model",
    "data",
    "optimizer",
    "lr_scheduler",
    "ckpt_path",
)
#: Keys of one ``trainer.callbacks`` entry.
ENTRY_KEYS: tuple[str, ...] = ("class_path", "init_args")
#: Class paths a recipe may always name (Lightning's namespace is the one chosen in ``_lightning``).
ALLOWED_PREFIXES: tuple[str, ...] = ("lightning_compress.", f"{pl.__name__}.callbacks.")

_KeyPath = tuple[object, ...]
_CALLBACKS_PATH: _KeyPath = ("trainer", "callbacks")
_YAML_HINTS = {
    "mapping values are not allowed": "a line is probably mis-indented, or a value containing ': ' needs quotes.",
    "found character '\\t'": "indent with spaces; YAML does not allow tabs.",
    "could not find expected ':'": "a `key: value` line is missing its colon, or a quote is not closed.",
    "expected <block end>": "check the indentation of this line against the lines above it.",
    "expected a single document": "a recipe is one YAML document; remove the extra `---`.",
}


class RecipeError(ValueError):
    """A recipe that cannot be used. ``path``, ``line``, ``key`` and ``hint`` are also kept as attributes."""

    def __init__(
        self,
        problem: str,
        *,
        path: str | None = None,
        line: int | None = None,
        column: int | None = None,
        key: str | None = None,
        hint: str | None = None,
    ) -> None:
        self.problem = problem
        self.path = path
        self.line = line
        self.key = key
        self.hint = hint
        super().__init__(_format_message(problem, path, line, column, key, hint))


def load_recipe(path: str | os.PathLike[str], *, extra_allowed_prefixes: Sequence[str] = ()) -> list[Callback]:
    """Read the recipe at ``path`` and return its ``trainer.callbacks``, built; ``[]`` when it names none.

    ``extra_allowed_prefixes`` adds packages whose classes may be named (``"my_project.callbacks."``); a prefix
    matches whole dotted components. Raises :class:`RecipeError` for anything wrong with the file.
    """
    prefixes = _allowed_prefixes(extra_allowed_prefixes)
    source, config = _read(path)
    return [_instantiate(source, spec) for spec in _callback_specs(source, config, prefixes)]


def validate_recipe_file(
    path: str | os.PathLike[str],
    *,
    extra_allowed_prefixes: Sequence[str] = (),
    construct: bool = True,
) -> dict[str, Any]:
    """Check the recipe at ``path`` as :func:`load_recipe` does and return its config for LightningCLI.

    The returned dict is a new copy of the parsed file in which every callback ``class_path`` is fully qualified
    (``ModelCheckpoint`` -> ``pytorch_lightning.callbacks.ModelCheckpoint``). With ``construct`` (the default) each
    callback is also built once and discarded, so that errors raised by a constructor are reported with the file
    and line too. Raises :class:`RecipeError`.
    """
    prefixes = _allowed_prefixes(extra_allowed_prefixes)
    source, config = _read(path)
    specs = _callback_specs(source, config, prefixes)
    if construct:
        for spec in specs:
            _instantiate(source, spec)
    return _normalized(config, specs)


# ---------------------------------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class _Source:
    """The recipe's name and the line of every key path, for messages."""

    name: str
    lines: Mapping[_KeyPath, int]
    texts: Mapping[_KeyPath, str] = field(default_factory=dict)  # scalars as written, e.g. 2:4 before YAML reads 124

    def line(self, path: _KeyPath) -> int:
        for end in range(len(path), -1, -1):
            if path[:end] in self.lines:
                return self.lines[path[:end]]
        return 1

    def error(self, path: _KeyPath, problem: str, hint: str | None = None) -> RecipeError:
        return RecipeError(problem, path=self.name, line=self.line(path), key=_format_key(path), hint=hint)


@dataclass(frozen=True)
class _CallbackSpec:
    path: _KeyPath
    cls: type[Callback]
    class_path: str
    init_args: Mapping[object, Any]


def _read(path: str | os.PathLike[str]) -> tuple[_Source, Any]:
    name = os.fspath(path)
    file = Path(name)
    if not file.exists():
        raise RecipeError("recipe file not found", path=str(name), hint=_missing_file_hint(file))
    if file.is_dir():
        raise RecipeError("is a directory, not a recipe file", path=str(name), hint=_directory_hint(file))
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise RecipeError(f"cannot read the recipe: {err}", path=str(name)) from err
    return _parse(str(name), text)


def _parse(name: str, text: str) -> tuple[_Source, Any]:
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return _Source(name, {}), None
        lines, texts = _index_lines(name, loader, node)  # before construction, which rewrites merge keys (<<)
        return _Source(name, lines, texts), loader.construct_document(node)
    except yaml.MarkedYAMLError as err:
        raise _yaml_error(name, err) from err
    except yaml.YAMLError as err:
        raise RecipeError(f"not valid YAML: {err}", path=name) from err
    finally:
        loader.dispose()


def _index_lines(
    name: str, loader: yaml.SafeLoader, root: yaml.Node
) -> tuple[dict[_KeyPath, int], dict[_KeyPath, str]]:
    """Map each key path to its 1-based line (and each plain scalar to its text as written).

    Each node is entered once, so aliases cannot make this explode.
    """
    lines: dict[_KeyPath, int] = {(): root.start_mark.line + 1}
    texts: dict[_KeyPath, str] = {}
    entered: set[int] = set()
    pending: list[tuple[_KeyPath, yaml.Node]] = [((), root)]
    while pending:
        path, node = pending.pop()
        if id(node) in entered:
            continue
        entered.add(id(node))
        for child_path, line, child in _children(name, loader, path, node):
            lines.setdefault(child_path, line)
            if isinstance(child, yaml.ScalarNode) and not child.style:
                texts.setdefault(child_path, child.value)
            pending.append((child_path, child))
    return lines, texts


def _children(
    name: str, loader: yaml.SafeLoader, path: _KeyPath, node: yaml.Node
) -> list[tuple[_KeyPath, int, yaml.Node]]:
    if isinstance(node, yaml.SequenceNode):
        return [(path + (index,), item.start_mark.line + 1, item) for index, item in enumerate(node.value)]
    if not isinstance(node, yaml.MappingNode):
        return []
    children: list[tuple[_KeyPath, int, yaml.Node]] = []
    first_lines: dict[object, int] = {}
    for key_node, value_node in node.value:
        if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node)
        line = key_node.start_mark.line + 1
        if key in first_lines:
            raise RecipeError(
                f"duplicate key {key!r} (first at line {first_lines[key]}); YAML would silently keep only the last",
                path=name,
                line=line,
                key=_format_key(path + (key,)),
                hint="merge the two entries into one.",
            )
        first_lines[key] = line
        children.append((path + (key,), line, value_node))
    return children


def _yaml_error(name: str, err: yaml.MarkedYAMLError) -> RecipeError:
    mark = err.problem_mark or err.context_mark
    line = mark.line + 1 if mark else None
    column = mark.column + 1 if mark else None
    problem = err.problem or "invalid YAML"
    if "could not determine a constructor for the tag" in problem:
        tag = problem.split("'")[1] if problem.count("'") >= 2 else "?"
        return RecipeError(
            f"the YAML tag `{tag.replace('tag:yaml.org,2002:', '!!')}` is not allowed: recipes are read with "
            "yaml.SafeLoader, which builds plain data only (mappings, lists, strings, numbers, booleans, null) "
            "and never imports or calls anything",
            path=name,
            line=line,
            hint="name a callback with `class_path:` and its arguments with `init_args:` under `trainer.callbacks`.",
        )
    context_line = f" at line {err.context_mark.line + 1}" if err.context and err.context_mark else ""
    context = f" ({err.context}{context_line})" if err.context else ""
    hint = next((text for needle, text in _YAML_HINTS.items() if needle in problem + context), None)
    return RecipeError(f"not valid YAML: {problem}{context}", path=name, line=line, column=column, hint=hint)


def _missing_file_hint(file: Path) -> str:
    folder = file.parent
    where = "" if file.is_absolute() else f" (relative paths start at {Path.cwd()})"
    if not folder.is_dir():
        return f"the folder {str(folder)!r} does not exist either{where}."
    close = difflib.get_close_matches(file.name, [child.name for child in folder.iterdir()], n=3)
    return f"did you mean {_alternatives(str(folder / c) for c in close)}?" if close else f"check the path{where}."


def _directory_hint(folder: Path) -> str:
    recipes = sorted(child.name for child in folder.iterdir() if child.suffix in {".yaml", ".yml"})
    return (
        f"name a file in it, e.g. {_alternatives(str(folder / r) for r in recipes[:3])}."
        if recipes
        else ("name a .yaml recipe file.")
    )


# ---------------------------------------------------------------------------------------------------- shape


def _callback_specs(source: _Source, config: Any, prefixes: tuple[str, ...]) -> list[_CallbackSpec]:
    config = _check_top_level(source, config)
    trainer = _check_trainer(source, config)
    entries = _callback_entries(source, trainer)
    return [_callback_spec(source, _CALLBACKS_PATH + (index,), entry, prefixes) for index, entry in enumerate(entries)]


def _check_top_level(source: _Source, config: Any) -> dict[object, Any]:
    if config is None:
        raise RecipeError(
            "the recipe is empty (nothing but comments or blank lines)",
            path=source.name,
            hint="a recipe has at least a `trainer:` section with `callbacks:`; see recipes/ for examples.",
        )
    if not isinstance(config, dict):
        raise source.error(
            (),
            f"the top level must be a mapping of LightningCLI sections ({_join(TOP_LEVEL_KEYS)}), got {_show(config)}",
        )
    for key in config:
        _require_known_key(source, (key,), key, TOP_LEVEL_KEYS, "top-level key")
    return config


def _check_trainer(source: _Source, config: Mapping[object, Any]) -> dict[object, Any]:
    trainer = config.get("trainer", {})
    if not isinstance(trainer, dict):
        raise source.error(
            ("trainer",),
            f"`trainer` must be a mapping of Trainer arguments, got {_show(trainer)}",
            hint="indent the Trainer arguments under it, e.g. `trainer: {max_epochs: 3}`.",
        )
    valid = _trainer_arguments()
    for key in trainer:
        _require_known_key(source, ("trainer", key), key, valid, "Trainer argument")
    return trainer


def _callback_entries(source: _Source, trainer: Mapping[object, Any]) -> list[Any]:
    callbacks = trainer.get("callbacks")
    if callbacks is None:
        return []
    if not isinstance(callbacks, list):
        raise source.error(
            _CALLBACKS_PATH,
            f"`trainer.callbacks` must be a list of callback entries, got {_show(callbacks)}",
            hint="start each entry with '- ', e.g. `callbacks: [{class_path: ModelCheckpoint}]`.",
        )
    return callbacks


def _callback_spec(source: _Source, path: _KeyPath, entry: Any, prefixes: tuple[str, ...]) -> _CallbackSpec:
    class_path, init_args = _check_entry(source, path, entry)
    cls, full_path = _resolve_class(source, path + ("class_path",), class_path, prefixes)
    _check_init_args(source, path, cls, init_args)
    return _CallbackSpec(path, cls, full_path, init_args)


def _check_entry(source: _Source, path: _KeyPath, entry: Any) -> tuple[str, dict[object, Any]]:
    if not isinstance(entry, dict):
        hint = f"write `- class_path: {entry}`." if isinstance(entry, str) else None
        raise source.error(
            path, f"a callback entry must be a mapping with `class_path` (and `init_args`), got {_show(entry)}", hint
        )
    for key in entry:
        _require_known_key(source, path + (key,), key, ENTRY_KEYS, "callback entry key")
    if "class_path" not in entry:
        raise source.error(
            path, "the callback entry has no `class_path`", hint="name its class, e.g. `- class_path: ModelCheckpoint`."
        )
    class_path = entry["class_path"]
    if not isinstance(class_path, str):
        raise source.error(
            path + ("class_path",), f"`class_path` must be a string naming a Callback class, got {_show(class_path)}"
        )
    init_args = entry.get("init_args", {})
    if not isinstance(init_args, dict):
        raise source.error(
            path + ("init_args",),
            f"`init_args` must be a mapping of argument names to values, got {_show(init_args)}",
            hint="write `init_args: {name: value}`, or leave `init_args` out for no arguments.",
        )
    return class_path, init_args


def _require_known_key(source: _Source, path: _KeyPath, key: object, valid: Sequence[str], what: str) -> None:
    if isinstance(key, str) and key in valid:
        return
    close = difflib.get_close_matches(str(key), valid, n=3)
    hint = f"did you mean {_alternatives(close)}?" if close else None
    raise source.error(path, f"unknown {what} {key!r}; valid: {_join(valid)}", hint)


def _trainer_arguments() -> tuple[str, ...]:
    parameters = inspect.signature(pl.Trainer).parameters.values()
    return tuple(p.name for p in parameters if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD))


# ---------------------------------------------------------------------------------------------------- classes


def _allowed_prefixes(extra: Sequence[str]) -> tuple[str, ...]:
    if isinstance(extra, str):
        raise TypeError(f"`extra_allowed_prefixes` takes a sequence of prefixes such as [{extra!r}], not one string")
    for prefix in extra:
        if not isinstance(prefix, str) or not prefix.strip("."):
            raise ValueError(f"`extra_allowed_prefixes` holds {prefix!r}; each must be a package prefix like 'my_pkg.'")
    return ALLOWED_PREFIXES + tuple(p if p.endswith(".") else f"{p}." for p in extra)


def _resolve_class(source: _Source, path: _KeyPath, class_path: str, prefixes: tuple[str, ...]) -> tuple[type, str]:
    """Check ``class_path`` as text, then import it and check what it names. Returns the class and its full path."""
    if not class_path or not all(part.isidentifier() for part in class_path.split(".")):
        raise source.error(path, f"`class_path` {class_path!r} is not a dotted Python name like 'package.module.Class'")
    full_path = class_path if "." in class_path else _expand_short_name(source, path, class_path)
    _require_allowed(source, path, full_path, prefixes)
    _require_public(source, path, full_path)
    found = _import_object(source, path, full_path)
    return _require_callback_class(source, path, full_path, found), full_path


def _short_names() -> dict[str, tuple[str, ...]]:
    """Short name -> full paths, over the public Callback classes of lightning_compress and Lightning's callbacks."""
    found: dict[str, list[str]] = {}
    for module_name in ("lightning_compress", f"{pl.__name__}.callbacks"):
        module = importlib.import_module(module_name)
        for name in getattr(module, "__all__", ()):
            if _is_callback_class(getattr(module, name, None)):
                found.setdefault(name, []).append(f"{module_name}.{name}")
    return {name: tuple(paths) for name, paths in found.items()}


def _expand_short_name(source: _Source, path: _KeyPath, name: str) -> str:
    known = _short_names()
    matches = known.get(name, ())
    if len(matches) == 1:
        return matches[0]
    if matches:
        problem = f"the short name {name!r} is ambiguous: {_join(matches)}"
        raise source.error(path, problem, "write the full class path.")
    close = difflib.get_close_matches(name, list(known), n=3)
    raise source.error(
        path,
        f"unknown callback class {name!r}; a name without dots must be one of: {_join(sorted(known))}",
        f"did you mean {_alternatives(close)}?" if close else "write the full class path, e.g. 'my_pkg.MyCallback'.",
    )


def _require_allowed(source: _Source, path: _KeyPath, full_path: str, prefixes: tuple[str, ...]) -> None:
    if any(full_path.startswith(prefix) or full_path == prefix[:-1] for prefix in prefixes):
        return
    close = _close_known_paths(full_path, [], cutoff=0.8)
    package = full_path.split(".")[0]
    trust = f"if you trust `{package}`, allow it with load_recipe(..., extra_allowed_prefixes=['{package}.'])."
    hint = f"did you mean {_alternatives(close)}? Otherwise, {trust}" if close else trust.capitalize()
    raise source.error(
        path,
        f"class {full_path!r} is outside the allowed packages ({_join(prefixes)}); it was not imported",
        hint,
    )


def _require_public(source: _Source, path: _KeyPath, full_path: str) -> None:
    private = [part for part in full_path.split(".") if part.startswith("_")]
    if private:
        close = _close_known_paths(full_path, [], cutoff=0.8)
        raise source.error(
            path,
            f"class path {full_path!r} has private part(s) {_join(private)}; a recipe may name public classes only",
            hint=f"did you mean {_alternatives(close)}?" if close else None,
        )


def _import_object(source: _Source, path: _KeyPath, full_path: str) -> object:
    """Import the longest importable module prefix of ``full_path`` and walk the rest as attributes."""
    parts = full_path.split(".")
    for split in range(len(parts) - 1, 0, -1):
        module = _import_module(source, path, ".".join(parts[:split]))
        if module is not None:
            return _walk_attributes(source, path, full_path, module, parts[split:])
    raise _unknown_class(source, path, full_path, f"no module {parts[0]!r}", None)


def _import_module(source: _Source, path: _KeyPath, module_name: str) -> types.ModuleType | None:
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
    source: _Source, path: _KeyPath, full_path: str, module: types.ModuleType, names: Sequence[str]
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
    source: _Source, path: _KeyPath, full_path: str, reason: str, module: types.ModuleType | None
) -> RecipeError:
    extra = [f"{module.__name__}.{n}" for n in dir(module) if not n.startswith("_")] if module else []
    close = _close_known_paths(full_path, [p for p in extra if _is_callback_class(_lookup(p, module))])
    return source.error(
        path,
        f"unknown callback class {full_path!r} ({reason}); known callbacks: {_join(sorted(_short_names()))}",
        f"did you mean {_alternatives(close)}?" if close else None,
    )


def _require_callback_class(source: _Source, path: _KeyPath, full_path: str, found: object) -> type:
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


# ---------------------------------------------------------------------------------------------------- arguments


def _check_init_args(source: _Source, path: _KeyPath, cls: type, init_args: Mapping[object, Any]) -> None:
    parameters = _init_parameters(cls)
    if parameters is None:  # no signature to check against: the constructor decides
        return
    named = {n: p for n, p in parameters.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    accepts_any = any(p.kind is p.VAR_KEYWORD for p in parameters.values())
    hints = _typecheck.init_type_hints(cls)
    for name, value in init_args.items():
        if name in named:
            _check_argument(source, path + ("init_args", name), cls, named[name], hints, value)
        elif not accepts_any:
            close = difflib.get_close_matches(str(name), list(named), n=3)
            raise source.error(
                path + ("init_args", name),
                f"{cls.__name__} has no argument {name!r}; valid arguments: {_join(named) or '(none)'}",
                f"did you mean {_alternatives(close)}?" if close else None,
            )
    missing = [n for n, p in named.items() if p.default is p.empty and n not in init_args]
    if missing:
        raise source.error(
            path + ("init_args",) if path + ("init_args",) in source.lines else path,
            f"{cls.__name__} requires argument(s) {_join(missing)}, which `init_args` does not set",
            hint=f"add them, e.g. `init_args: {{{missing[0]}: ...}}`.",
        )


def _init_parameters(cls: type) -> Mapping[str, inspect.Parameter] | None:
    try:
        return inspect.signature(cls).parameters
    except (TypeError, ValueError):
        return None


def _check_argument(
    source: _Source,
    path: _KeyPath,
    cls: type,
    parameter: inspect.Parameter,
    hints: Mapping[str, Any],
    value: object,
) -> None:
    mismatch = _typecheck.check(value, hints.get(parameter.name, parameter.annotation))
    if mismatch is None:
        return
    where = "".join(f"[{part!r}]" for part in mismatch.where)
    written = source.texts.get(path + mismatch.where)
    hint = _typecheck.suggest(mismatch)
    if written is not None and ":" in written and isinstance(mismatch.value, int):
        hint = f"YAML 1.1 reads {written} as the base-60 number {mismatch.value}; quote it: '{written}'."
    raise source.error(
        path + mismatch.where,
        f"{cls.__name__} argument `{parameter.name}`{where and f' item {where}'} expects {mismatch.expected}, "
        f"got {_show(mismatch.value)}",
        hint,
    )


def _instantiate(source: _Source, spec: _CallbackSpec) -> Callback:
    arguments = copy.deepcopy(dict(spec.init_args))  # constructors may keep or change what they are given
    try:
        return spec.cls(**arguments)
    except Exception as err:  # noqa: BLE001 - reported with the file and line, and chained
        raise source.error(
            spec.path, f"{spec.class_path}(...) raised {type(err).__name__}: {err}", "check this callback's init_args."
        ) from err


def _normalized(config: Mapping[object, Any], specs: Sequence[_CallbackSpec]) -> dict[str, Any]:
    """A copy of ``config`` whose callback class paths are fully qualified."""
    result = {key: copy.deepcopy(value) for key, value in config.items() if key != "trainer"}
    if "trainer" in config:
        trainer = {key: copy.deepcopy(value) for key, value in config["trainer"].items() if key != "callbacks"}
        if config["trainer"].get("callbacks") is not None:
            entries = config["trainer"]["callbacks"]
            trainer["callbacks"] = [
                {**copy.deepcopy(entry), "class_path": spec.class_path}
                for entry, spec in zip(entries, specs, strict=True)
            ]
        elif "callbacks" in config["trainer"]:
            trainer["callbacks"] = None
        result["trainer"] = trainer
    return result


# ---------------------------------------------------------------------------------------------------- text

_MISSING = object()


def _lookup(full_path: str, module: types.ModuleType | None) -> object:
    return getattr(module, full_path.rsplit(".", 1)[-1], None)


def _is_callback_class(found: object) -> bool:
    return isinstance(found, type) and issubclass(found, Callback)


def _name_of(owner: object) -> str:
    return getattr(owner, "__qualname__", None) or getattr(owner, "__name__", None) or type(owner).__name__


def _format_key(path: _KeyPath) -> str | None:
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) and not isinstance(part, bool) else f".{part}"
    return text.lstrip(".") or None


def _format_message(
    problem: str, path: str | None, line: int | None, column: int | None, key: str | None, hint: str | None
) -> str:
    where = [part for part in (path, line and f"line {line}", column and f"column {column}") if part]
    if key:
        where.append(f"`{key}`")
    message = f"{', '.join(where)}: {problem}" if where else problem
    return f"{message}\nHINT: {hint}" if hint else message


def _show(value: object) -> str:
    kinds = {type(None): "null", dict: "mapping", list: "list"}
    text = "null" if value is None else repr(value)
    text = text if len(text) <= 80 else f"{text[:77]}..."
    return text if value is None else f"{text} ({kinds.get(type(value), type(value).__name__)})"


def _join(items: Sequence[object] | Mapping[object, object]) -> str:
    return ", ".join(str(item) for item in items)


def _alternatives(items: Sequence[str] | Any) -> str:
    return " or ".join(f"`{item}`" for item in items)
