"""The layout of a recipe, checked as text: LightningCLI's sections, Trainer argument names, callback entries.

Nothing here imports what the file names.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from lightning_compress._lightning import Trainer
from lightning_compress.recipes.errors import KeyPath, RecipeError, Source, alternatives, join, show

__all__ = [
    "CALLBACKS_PATH",
    "ENTRY_KEYS",
    "MAX_VALUES",
    "TOP_LEVEL_KEYS",
    "callback_entries",
    "check_entry",
    "check_top_level",
    "check_trainer",
    "values_in",
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
#: How many values (aliases expanded) the ``trainer`` section may hold; the shipped recipes hold fewer than 30.
MAX_VALUES = 10_000
CALLBACKS_PATH: KeyPath = ("trainer", "callbacks")


def check_top_level(source: Source, config: Any) -> dict[object, Any]:
    if config is None:
        raise RecipeError(
            "the recipe is empty (nothing but comments or blank lines)",
            path=source.name,
            hint="a recipe has at least a `trainer:` section with `callbacks:`; see recipes/ for examples.",
        )
    if not isinstance(config, dict):
        raise source.error(
            (),
            f"the top level must be a mapping of LightningCLI sections ({join(TOP_LEVEL_KEYS)}), got {show(config)}",
        )
    for key in config:
        _require_known_key(source, (key,), key, TOP_LEVEL_KEYS, "top-level key")
    return config


def check_trainer(source: Source, config: Mapping[object, Any]) -> dict[str, Any]:
    """The ``trainer`` section (``{}`` when absent), its keys checked against the Trainer's arguments."""
    trainer = config.get("trainer", {})
    if not isinstance(trainer, dict):
        raise source.error(
            ("trainer",),
            f"`trainer` must be a mapping of Trainer arguments, got {show(trainer)}",
            hint="indent the Trainer arguments under it, e.g. `trainer: {max_epochs: 3}`.",
        )
    valid = _trainer_arguments()
    for key in trainer:
        _require_known_key(source, ("trainer", key), key, valid, "Trainer argument")
    for _ in values_in(source, ("trainer",), trainer):  # refuses a section that aliases blow up
        pass
    return trainer


def callback_entries(source: Source, trainer: Mapping[str, Any]) -> list[Any]:
    callbacks = trainer.get("callbacks")
    if callbacks is None:
        return []
    if not isinstance(callbacks, list):
        raise source.error(
            CALLBACKS_PATH,
            f"`trainer.callbacks` must be a list of callback entries, got {show(callbacks)}",
            hint="start each entry with '- ', e.g. `callbacks: [{class_path: ModelCheckpoint}]`.",
        )
    return callbacks


def check_entry(source: Source, path: KeyPath, entry: Any) -> tuple[str, dict[str, Any]]:
    """An entry's ``class_path`` and ``init_args`` (``{}`` when absent), their layout checked."""
    if not isinstance(entry, dict):
        hint = f"write `- class_path: {entry}`." if isinstance(entry, str) else None
        raise source.error(
            path, f"a callback entry must be a mapping with `class_path` (and `init_args`), got {show(entry)}", hint
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
            path + ("class_path",), f"`class_path` must be a string naming a Callback class, got {show(class_path)}"
        )
    init_args = entry.get("init_args", {})
    if not isinstance(init_args, dict) or not all(isinstance(name, str) for name in init_args):
        raise source.error(
            path + ("init_args",),
            f"`init_args` must be a mapping of argument names to values, got {show(init_args)}",
            hint="write `init_args: {name: value}`, or leave `init_args` out for no arguments.",
        )
    return class_path, init_args


def values_in(source: Source, path: KeyPath, value: object) -> Iterator[tuple[KeyPath, object]]:
    """Every value inside ``value`` (itself included) with its key path, aliases expanded, at most MAX_VALUES."""
    pending: list[tuple[KeyPath, object]] = [(path, value)]
    count = 0
    while pending:
        where, item = pending.pop()
        count += 1
        if count > MAX_VALUES:
            raise source.error(
                path,
                f"`{'.'.join(map(str, path))}` holds more than {MAX_VALUES:,} values once its YAML aliases are "
                "expanded",
                hint="write the values out instead of repeating aliases (`*name`).",
            )
        yield where, item
        if isinstance(item, dict):
            pending.extend((where + (key,), child) for key, child in reversed(item.items()))
        elif isinstance(item, list):
            pending.extend((where + (index,), child) for index, child in reversed(list(enumerate(item))))


def _require_known_key(source: Source, path: KeyPath, key: object, valid: Sequence[str], what: str) -> None:
    if isinstance(key, str) and key in valid:
        return
    close = difflib.get_close_matches(str(key), valid, n=3)
    hint = f"did you mean {alternatives(close)}?" if close else None
    raise source.error(path, f"unknown {what} {key!r}; valid: {join(valid)}", hint)


def _trainer_arguments() -> tuple[str, ...]:
    parameters = inspect.signature(Trainer).parameters.values()
    return tuple(p.name for p in parameters if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD))
