"""RecipeError, the recipe's source (its name and the line of every key) and the wording shared by every message."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

__all__ = ["KeyPath", "RecipeError", "Source", "alternatives", "format_key", "join", "show"]

#: A position in the parsed recipe: mapping keys and list indices, e.g. ("trainer", "callbacks", 0, "class_path").
KeyPath = tuple[object, ...]


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


@dataclass(frozen=True)
class Source:
    """The recipe's name and the line of every key path, for messages."""

    name: str
    lines: Mapping[KeyPath, int]
    texts: Mapping[KeyPath, str] = field(default_factory=dict)  # scalars as written, e.g. 2:4 before YAML reads 124

    def line(self, path: KeyPath) -> int:
        for end in range(len(path), -1, -1):
            if path[:end] in self.lines:
                return self.lines[path[:end]]
        return 1

    def error(self, path: KeyPath, problem: str, hint: str | None = None) -> RecipeError:
        return RecipeError(problem, path=self.name, line=self.line(path), key=format_key(path), hint=hint)


def format_key(path: KeyPath) -> str | None:
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) and not isinstance(part, bool) else f".{part}"
    return text.lstrip(".") or None


def show(value: object) -> str:
    """``value`` as a message shows it: its repr (cut at 80 characters) and, for non-null values, its YAML kind."""
    kinds = {type(None): "null", dict: "mapping", list: "list"}
    try:
        text = "null" if value is None else repr(value)
    except ValueError:  # an int too long for repr (sys.get_int_max_str_digits)
        text = f"<an int of about {int(value.bit_length() * 0.30103)} digits>" if isinstance(value, int) else "?"
    text = text if len(text) <= 80 else f"{text[:77]}..."
    return text if value is None else f"{text} ({kinds.get(type(value), type(value).__name__)})"


def join(items: Iterable[object]) -> str:
    return ", ".join(str(item) for item in items)


def alternatives(items: Iterable[str]) -> str:
    return " or ".join(f"`{item}`" for item in items)


def _format_message(
    problem: str, path: str | None, line: int | None, column: int | None, key: str | None, hint: str | None
) -> str:
    where = [part for part in (path, line and f"line {line}", column and f"column {column}") if part]
    if key:
        where.append(f"`{key}`")
    message = f"{', '.join(where)}: {problem}" if where else problem
    return f"{message}\nHINT: {hint}" if hint else message
