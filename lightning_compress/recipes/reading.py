"""Reading a recipe: the file, ``yaml.SafeLoader`` (plain data only) and the line of every key, before anything else.

Nothing here imports or calls what the file names; a YAML tag that would build an object is refused by the loader.
"""

from __future__ import annotations

import difflib
import os
import sys
from pathlib import Path
from typing import Any

import yaml

from lightning_compress.recipes.errors import KeyPath, RecipeError, Source, alternatives, format_key

__all__ = ["MAX_DEPTH", "read"]

#: How deeply a recipe may nest mappings and lists (the shipped recipes nest 5 levels).
MAX_DEPTH = 64
_YAML_HINTS = {
    "mapping values are not allowed": "a line is probably mis-indented, or a value containing ': ' needs quotes.",
    "found character '\\t'": "indent with spaces; YAML does not allow tabs.",
    "could not find expected ':'": "a `key: value` line is missing its colon, or a quote is not closed.",
    "expected <block end>": "check the indentation of this line against the lines above it.",
    "expected a single document": "a recipe is one YAML document; remove the extra `---`.",
}


def read(path: str | os.PathLike[str]) -> tuple[Source, Any]:
    """The recipe's :class:`Source` and its parsed content (``None`` for an empty file)."""
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


def _parse(name: str, text: str) -> tuple[Source, Any]:
    try:
        loader = yaml.SafeLoader(text)  # its reader refuses non-printable characters at once
    except yaml.reader.ReaderError as err:
        line = text.count("\n", 0, err.position) + 1
        raise RecipeError(
            f"not valid YAML: character #x{err.character:04x} is not allowed in a YAML file",
            path=name,
            line=line,
            hint='remove the control character (or write it as an escape inside double quotes, e.g. "\\t").',
        ) from err
    try:
        node = loader.get_single_node()
        if node is None:
            return Source(name, {}), None
        _check_nesting(name, node)
        if isinstance(node, yaml.ScalarNode):
            _require_readable_scalar(name, node, ())
        lines, texts = _index_lines(name, loader, node)  # before construction, which rewrites merge keys (<<)
        return Source(name, lines, texts), loader.construct_document(node)
    except RecipeError:
        raise
    except yaml.MarkedYAMLError as err:
        raise _yaml_error(name, err) from err
    except yaml.YAMLError as err:
        raise RecipeError(f"not valid YAML: {err}", path=name) from err
    except RecursionError as err:
        raise RecipeError(f"not valid YAML: nested more than {MAX_DEPTH} levels deep", path=name) from err
    except ValueError as err:  # a scalar YAML reads but Python cannot hold, e.g. an int of more than 4,300 digits
        raise RecipeError(f"not valid YAML: {err}", path=name, hint="write a smaller number.") from err
    except Exception as err:  # noqa: BLE001 - PyYAML's constructors fail with bare Python errors on odd input
        problem = f"not valid YAML: PyYAML could not build it ({type(err).__name__}: {err})"
        raise RecipeError(problem, path=name) from err
    finally:
        loader.dispose()


def _index_lines(name: str, loader: yaml.SafeLoader, root: yaml.Node) -> tuple[dict[KeyPath, int], dict[KeyPath, str]]:
    """Map each key path to its 1-based line (and each plain scalar to its text as written).

    Each node is entered once, so aliases cannot make this explode.
    """
    lines: dict[KeyPath, int] = {(): root.start_mark.line + 1}
    texts: dict[KeyPath, str] = {}
    entered: set[int] = set()
    pending: list[tuple[KeyPath, yaml.Node]] = [((), root)]
    while pending:
        path, node = pending.pop()
        if id(node) in entered:
            continue
        entered.add(id(node))
        for child_path, line, child in _children(name, loader, path, node):
            lines.setdefault(child_path, line)
            if isinstance(child, yaml.ScalarNode) and not child.style:
                texts.setdefault(child_path, child.value)
                _require_readable_number(name, child, child_path)
            if isinstance(child, yaml.ScalarNode):
                _require_readable_scalar(name, child, child_path)
            pending.append((child_path, child))
    return lines, texts


def _check_nesting(name: str, root: yaml.Node) -> None:
    """Refuse an alias that contains itself, and nesting deeper than :data:`MAX_DEPTH` (aliases included).

    Each node's height is computed once, so this takes time in proportion to the nodes written, not to the values
    the aliases stand for.
    """
    heights: dict[int, int] = {}
    open_nodes: set[int] = set()
    pending: list[tuple[yaml.Node, KeyPath, bool]] = [(root, (), False)]
    while pending:
        node, path, children_done = pending.pop()
        children = _child_nodes(node, path)
        if children_done:
            open_nodes.discard(id(node))
            heights[id(node)] = 1 + max((heights[id(child)] for child, _ in children), default=0)
            if heights[id(node)] > MAX_DEPTH:
                raise _nesting_error(name, node, path, f"holds values nested more than {MAX_DEPTH} levels deep")
            continue
        if id(node) in heights:
            continue
        if id(node) in open_nodes:
            raise _nesting_error(name, node, path, "a YAML alias refers to a node that contains it (an endless value)")
        open_nodes.add(id(node))
        pending.append((node, path, True))
        pending.extend((child, child_path, False) for child, child_path in children)


def _child_nodes(node: yaml.Node, path: KeyPath) -> list[tuple[yaml.Node, KeyPath]]:
    if isinstance(node, yaml.SequenceNode):
        return [(child, path + (index,)) for index, child in enumerate(node.value)]
    if isinstance(node, yaml.MappingNode):
        keys = [(key, path + ("<key>",)) for key, _ in node.value]
        return keys + [(value, path + (getattr(key, "value", "?"),)) for key, value in node.value]
    return []


def _nesting_error(name: str, node: yaml.Node, path: KeyPath, problem: str) -> RecipeError:
    key = format_key(path[:8]) if len(path) <= 8 else f"{format_key(path[:8])}..."
    return RecipeError(
        problem,
        path=name,
        line=node.start_mark.line + 1,
        key=key,
        hint="write the value out instead of an alias (`*name`) that repeats or contains it; a recipe holds a few "
        "levels of sections, callbacks and their arguments.",
    )


def _children(
    name: str, loader: yaml.SafeLoader, path: KeyPath, node: yaml.Node
) -> list[tuple[KeyPath, int, yaml.Node]]:
    if isinstance(node, yaml.SequenceNode):
        return [(path + (index,), item.start_mark.line + 1, item) for index, item in enumerate(node.value)]
    if not isinstance(node, yaml.MappingNode):
        return []
    children: list[tuple[KeyPath, int, yaml.Node]] = []
    first_lines: dict[object, int] = {}
    for key_node, value_node in node.value:
        if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
            continue
        _require_readable_scalar(name, key_node, path + ("<key>",))
        key = loader.construct_object(key_node)
        line = key_node.start_mark.line + 1
        if key in first_lines:
            raise RecipeError(
                f"duplicate key {key!r} (first at line {first_lines[key]}); YAML would silently keep only the last",
                path=name,
                line=line,
                key=format_key(path + (key,)),
                hint="merge the two entries into one.",
            )
        first_lines[key] = line
        children.append((path + (key,), line, value_node))
    return children


def _require_readable_number(name: str, node: yaml.ScalarNode, path: KeyPath) -> None:
    """Python refuses to read a decimal integer of more digits than ``sys.get_int_max_str_digits()``."""
    limit = sys.get_int_max_str_digits()
    digits = node.value.lstrip("+-").replace("_", "")
    if limit and len(digits) > limit and digits.isdigit():
        raise RecipeError(
            f"an integer of {len(digits):,} digits; Python reads at most {limit:,}",
            path=name,
            line=node.start_mark.line + 1,
            key=format_key(path),
            hint="write a smaller number.",
        )


def _require_readable_scalar(name: str, node: yaml.ScalarNode, path: KeyPath) -> None:
    """A scalar with an explicit standard tag that its text does not fit (``!!timestamp null``, ``!!bool maybe``,
    ``!!int x``) makes PyYAML's constructors fail with a bare Python error; refuse it here, with its line."""
    if node.tag == "tag:yaml.org,2002:str" or node.tag not in yaml.SafeLoader.yaml_constructors:
        return  # plain strings always read; an unknown tag gets the tag message at construction
    try:
        yaml.constructor.SafeConstructor().construct_object(node)
    except yaml.YAMLError:
        return  # worded by the loader itself, with its mark
    except Exception as err:  # noqa: BLE001 - PyYAML raises AttributeError, KeyError, ValueError, ... here
        tag = node.tag.replace("tag:yaml.org,2002:", "!!")
        raise RecipeError(
            f"the value {node.value!r} cannot be read as `{tag}` ({type(err).__name__}: {err})",
            path=name,
            line=node.start_mark.line + 1,
            key=format_key(path),
            hint=f"remove the `{tag}` tag, or write a value of that type.",
        ) from err


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
    return f"did you mean {alternatives(str(folder / c) for c in close)}?" if close else f"check the path{where}."


def _directory_hint(folder: Path) -> str:
    recipes = sorted(child.name for child in folder.iterdir() if child.suffix in {".yaml", ".yml"})
    if recipes:
        return f"name a file in it, e.g. {alternatives(str(folder / r) for r in recipes[:3])}."
    return "name a .yaml recipe file."
