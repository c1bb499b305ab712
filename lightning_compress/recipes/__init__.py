"""Recipes: LightningCLI-format YAML files whose ``trainer.callbacks`` become Callback instances.

The same file works two ways::

    callbacks = load_recipe("recipes/digits_gmp90.yaml")          # Python: a list of callbacks
    lightning-compress fit --config recipes/digits_gmp90.yaml     # CLI: a whole run

A recipe is untrusted input, so it is read in this order and nothing from it is imported or called early:

1. ``yaml.SafeLoader`` builds plain data only (``!!python/...`` tags are refused); aliases that contain themselves,
   nesting deeper than 64 levels and a ``trainer`` section that aliases blow up are refused (:mod:`.reading`);
2. the layout is checked as text: top-level keys, Trainer argument names, ``trainer.callbacks`` a list of
   ``{class_path, init_args}`` entries (:mod:`.layout`);
3. every ``class_path`` in ``trainer`` is checked against the allow-list *before* any import (``lightning_compress.``,
   ``<lightning namespace>.callbacks.``, plus ``extra_allowed_prefixes``; short names resolve against the public
   callbacks of both; elsewhere in ``trainer`` Lightning's own classes too); private components (``_x``) are refused
   (:mod:`.classes`);
4. the callback classes are imported and must subclass ``Callback`` (they are never called otherwise);
5. the whole ``trainer`` section is typed by jsonargparse as LightningCLI's parser types it, with the modules that
   any other string of the recipe names outside the allow-list refused (:mod:`.arguments`, :mod:`.guard`);
6. only then are the callbacks built, and a constructor's exception is reported with the file, line and class.

Every failure is a :class:`RecipeError` whose message names the file, the line, the key path, the bad value,
what would be valid and, where one helps, a ``HINT:``::

    recipe.yaml, line 6, `trainer.callbacks[0].init_args.patience`: EarlyStopping argument `patience` expects int,
    got 'three' (str)
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping, Sequence
from typing import Any

from lightning_compress._lightning import Callback
from lightning_compress.recipes.arguments import CallbackSpec, check_arguments
from lightning_compress.recipes.classes import ALLOWED_PREFIXES, Allowed, callback_path, import_callback
from lightning_compress.recipes.errors import RecipeError, Source
from lightning_compress.recipes.guard import check_class_paths
from lightning_compress.recipes.layout import (
    CALLBACKS_PATH,
    ENTRY_KEYS,
    TOP_LEVEL_KEYS,
    callback_entries,
    check_entry,
    check_top_level,
    check_trainer,
)
from lightning_compress.recipes.reading import read

__all__ = [
    "ALLOWED_PREFIXES",
    "ENTRY_KEYS",
    "TOP_LEVEL_KEYS",
    "RecipeError",
    "load_recipe",
    "validate_recipe_file",
]


def load_recipe(path: str | os.PathLike[str], *, extra_allowed_prefixes: Sequence[str] = ()) -> list[Callback]:
    """Read the recipe at ``path`` and return its ``trainer.callbacks``, built; ``[]`` when it names none.

    ``extra_allowed_prefixes`` adds packages whose classes may be named (``"my_project.callbacks."``); a prefix
    matches whole dotted components. Raises :class:`RecipeError` for anything wrong with the file.
    """
    source, _, specs = _checked(path, Allowed.with_extra(extra_allowed_prefixes))
    return [_instantiate(source, spec) for spec in specs]


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
    source, config, specs = _checked(path, Allowed.with_extra(extra_allowed_prefixes))
    if construct:
        for spec in specs:
            _instantiate(source, spec)
    return _normalized(config, specs)


def _checked(path: str | os.PathLike[str], allowed: Allowed) -> tuple[Source, dict[object, Any], list[CallbackSpec]]:
    """Steps 1-5 of the module docstring: the source, the parsed config and the checked callback entries."""
    source, config = read(path)
    config = check_top_level(source, config)
    trainer = check_trainer(source, config)
    entries = [
        (CALLBACKS_PATH + (index,), *check_entry(source, CALLBACKS_PATH + (index,), entry))
        for index, entry in enumerate(callback_entries(source, trainer))
    ]
    full_paths = [callback_path(source, where + ("class_path",), name, allowed.callbacks) for where, name, _ in entries]
    check_class_paths(source, trainer, allowed, skip={where for where, _, _ in entries})
    specs = [
        CallbackSpec(where, import_callback(source, where + ("class_path",), full_path), full_path, init_args)
        for (where, _, init_args), full_path in zip(entries, full_paths, strict=True)
    ]
    check_arguments(source, trainer, specs, allowed)
    return source, config, specs


def _instantiate(source: Source, spec: CallbackSpec) -> Callback:
    arguments = copy.deepcopy(dict(spec.init_args))  # constructors may keep or change what they are given
    try:
        return spec.cls(**arguments)
    except Exception as err:  # noqa: BLE001 - reported with the file and line, and chained
        raise source.error(
            spec.path, f"{spec.class_path}(...) raised {type(err).__name__}: {err}", "check this callback's init_args."
        ) from err


def _normalized(config: Mapping[object, Any], specs: Sequence[CallbackSpec]) -> dict[str, Any]:
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
