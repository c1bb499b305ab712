"""Recipes: a LightningCLI-format YAML file becomes a list of callbacks, or a RecipeError that says what to fix.

Every bad recipe below must fail with a message that names the file, the line, the key path and what is valid,
and nothing the file names may be imported or called before it has been checked.
"""

from __future__ import annotations  # the callbacks below must still be checked against their (string) annotations

import re
import textwrap
import time
from pathlib import Path
from typing import Literal

import pytest
import yaml
from pytorch_lightning.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint

from lightning_compress import RecipeError, load_recipe
from lightning_compress._lightning import Callback
from lightning_compress.recipes import validate_recipe_file

HERE = __name__  # the class paths of the callbacks defined in this file start with it


class AnnotatedCallback(Callback):
    """A callback of "a user's own package", annotated in the style of the project's callbacks."""

    def __init__(
        self,
        steps: int,
        mode: Literal["fast", "slow"] = "fast",
        include: list[str] | None = None,
        ratio: float = 0.5,
        enabled: bool = True,
        output: Path | None = None,
    ) -> None:
        self.steps, self.mode, self.include, self.ratio, self.enabled, self.output = (
            steps,
            mode,
            include,
            ratio,
            enabled,
            output,
        )


class KwargsCallback(Callback):
    def __init__(self, **options: object) -> None:
        self.options = options


def write(tmp_path: Path, text: str, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------------ good recipes


def test_lightning_callbacks_by_short_name_and_full_path(tmp_path: Path) -> None:
    recipe = write(
        tmp_path,
        f"""
        seed_everything: 7
        trainer:
          max_epochs: 3
          callbacks:
            - class_path: ModelCheckpoint
              init_args: {{dirpath: {tmp_path / "ckpt"}, monitor: val_loss, save_top_k: 2}}
            - class_path: pytorch_lightning.callbacks.EarlyStopping
              init_args:
                monitor: val_acc
                patience: 5
                mode: max
                min_delta: 0          # an int where a float is expected is fine
            - class_path: LearningRateMonitor
        model:
          class_path: lightning_compress.models.ImageClassifier   # not imported by load_recipe
        """,
    )

    checkpoint, early_stopping, lr_monitor = load_recipe(recipe)

    assert isinstance(checkpoint, ModelCheckpoint)
    assert (checkpoint.monitor, checkpoint.save_top_k, Path(checkpoint.dirpath)) == ("val_loss", 2, tmp_path / "ckpt")
    assert isinstance(early_stopping, EarlyStopping)
    assert (early_stopping.monitor, early_stopping.patience, early_stopping.mode) == ("val_acc", 5, "max")
    assert isinstance(lr_monitor, LearningRateMonitor)


@pytest.mark.parametrize(
    "text",
    [
        "trainer:\n  max_epochs: 1\nmodel: {class_path: lightning_compress.models.ImageClassifier}\n",
        "trainer:\n  callbacks:\n",  # `callbacks:` left empty (null) is no callbacks, as for Trainer(callbacks=None)
        "trainer:\n  callbacks: []\n",
        "seed_everything: 1\n",
    ],
    ids=["no-callbacks-key", "callbacks-null", "callbacks-empty", "no-trainer"],
)
def test_recipe_without_callbacks_gives_empty_list(tmp_path: Path, text: str) -> None:
    assert load_recipe(write(tmp_path, text)) == []


def test_own_callbacks_need_extra_allowed_prefixes_and_string_annotations_are_checked(tmp_path: Path) -> None:
    recipe = write(
        tmp_path,
        f"""
        trainer:
          callbacks:
            - class_path: {HERE}.AnnotatedCallback
              init_args: {{steps: 10, mode: slow, include: ["conv.*", fc], ratio: 1, output: out/model.pt}}
            - class_path: {HERE}.KwargsCallback
              init_args: {{anything: [1, 2], goes: true}}
        """,
    )
    not_allowed = rf"outside the allowed packages.*\nHINT: If you trust `{HERE}`, .*allowed_prefixes=\['{HERE}\.'\]"
    with pytest.raises(RecipeError, match=not_allowed):
        load_recipe(recipe)

    annotated, kwargs = load_recipe(recipe, extra_allowed_prefixes=[f"{HERE}."])

    assert (annotated.steps, annotated.mode, annotated.include, annotated.ratio) == (10, "slow", ["conv.*", "fc"], 1)
    assert kwargs.options == {"anything": [1, 2], "goes": True}


def test_short_names_cover_the_callbacks_lightning_compress_exports(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import lightning_compress

    monkeypatch.setattr(lightning_compress, "AnnotatedCallback", AnnotatedCallback, raising=False)
    monkeypatch.setattr(lightning_compress, "__all__", [*lightning_compress.__all__, "AnnotatedCallback"])
    recipe = write(tmp_path, "trainer:\n  callbacks:\n    - {class_path: AnnotatedCallback, init_args: {steps: 3}}\n")

    (callback,) = load_recipe(recipe)
    assert isinstance(callback, AnnotatedCallback) and callback.steps == 3
    (entry,) = validate_recipe_file(recipe)["trainer"]["callbacks"]
    assert entry["class_path"] == "lightning_compress.AnnotatedCallback"

    monkeypatch.setattr(lightning_compress, "EarlyStopping", KwargsCallback, raising=False)
    monkeypatch.setattr(lightning_compress, "__all__", [*lightning_compress.__all__, "EarlyStopping"])
    recipe = write(tmp_path, "trainer:\n  callbacks:\n    - class_path: EarlyStopping\n")
    with pytest.raises(
        RecipeError,
        match=r"line 3, .*short name 'EarlyStopping' is ambiguous: lightning_compress\."
        r"EarlyStopping, pytorch_lightning\.callbacks\.EarlyStopping\nHINT: write the full class path",
    ):
        load_recipe(recipe)


def test_a_prefix_matches_whole_components_only(tmp_path: Path) -> None:
    recipe = write(tmp_path, f"trainer:\n  callbacks:\n    - class_path: {HERE}.KwargsCallback\n")
    with pytest.raises(RecipeError, match="outside the allowed packages"):
        load_recipe(recipe, extra_allowed_prefixes=[HERE[:-1]])  # "test_recipe" must not allow "test_recipes.X"
    assert len(load_recipe(recipe, extra_allowed_prefixes=[HERE])) == 1  # the trailing dot is optional


def test_validate_recipe_file_returns_a_config_with_full_class_paths_and_leaves_the_file_alone(tmp_path: Path) -> None:
    text = """
        trainer:
          max_epochs: 2
          callbacks:
            - class_path: ModelCheckpoint
              init_args: {monitor: val_loss}
        model: {class_path: lightning_compress.models.ImageClassifier, init_args: {num_classes: 10}}
        """
    recipe = write(tmp_path, text)

    config = validate_recipe_file(recipe)

    assert config["trainer"]["callbacks"] == [
        {"class_path": "pytorch_lightning.callbacks.ModelCheckpoint", "init_args": {"monitor": "val_loss"}}
    ]
    assert config["model"] == yaml.safe_load(recipe.read_text())["model"]
    assert config["trainer"]["max_epochs"] == 2
    assert recipe.read_text() == textwrap.dedent(text).lstrip("\n")


def test_errors_carry_their_location_as_attributes(tmp_path: Path) -> None:
    recipe = write(
        tmp_path, "trainer:\n  callbacks:\n    - class_path: ModelCheckpoint\n      init_args: {save_top_k: 2.5}"
    )
    with pytest.raises(RecipeError) as info:
        load_recipe(recipe)
    error = info.value
    assert (error.path, error.line, error.key) == (str(recipe), 4, "trainer.callbacks[0].init_args.save_top_k")
    assert isinstance(error, ValueError)


def test_aliases_cannot_blow_up_loading(tmp_path: Path) -> None:
    levels = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    levels += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]  # 10**9 leaves if expanded
    recipe = write(tmp_path, "model:\n" + "".join(f"  {line}\n" for line in levels))
    started = time.perf_counter()
    assert load_recipe(recipe) == []
    assert time.perf_counter() - started < 2.0


# ------------------------------------------------------------------------------------------------ bad recipes
# Each case: (recipe text, patterns). The first pattern is the `match=` of pytest.raises; the others must also be
# found in the message. "{marker}" in a recipe is replaced by a path that must still not exist afterwards.

MISSING, DIRECTORY = None, "<a directory>"

BAD_RECIPES = {
    "tagged-value-that-does-not-fit-its-tag": (  # found by the fuzz test: PyYAML raised AttributeError here
        """
        trainer: !!timestamp null
        """,
        [r"recipe\.yaml, line 1, `trainer`: the value 'null' cannot be read as `!!timestamp`", "HINT: remove"],
    ),
    "tagged-key-that-does-not-fit-its-tag": (
        """
        trainer:
          !!bool maybe: 3
        """,
        [r"recipe\.yaml, line 2, `trainer\.<key>`: the value 'maybe' cannot be read as `!!bool` \(KeyError"],
    ),
    "missing-file": (MISSING, [r"recipe\.yaml: recipe file not found", "HINT: check the path"]),
    "directory": (DIRECTORY, [r"recipe\.yaml: is a directory, not a recipe file"]),
    "yaml-syntax": (
        """
        trainer:
          max_epochs: 3
           callbacks: []
        """,
        [r"recipe\.yaml, line 3, column 13: not valid YAML", "mapping values are not allowed", "HINT: .*indent"],
    ),
    "yaml-unclosed-bracket": (
        """
        trainer:
          callbacks: [ModelCheckpoint
        model: {}
        """,
        [r"recipe\.yaml, line 3, column 6: not valid YAML", r"flow sequence at line 2"],
    ),
    "empty-file": (
        "# nothing here yet\n\n",
        [r"recipe\.yaml: the recipe is empty", r"HINT: .*`trainer:`"],
    ),
    "top-level-not-a-mapping": (
        "- trainer\n- model\n",
        [r"recipe\.yaml, line 1: the top level must be a mapping", "seed_everything, trainer, model", r"\(list\)"],
    ),
    "unknown-top-level-key": (
        """
        trainer: {}
        modle: {}
        """,
        [
            r"recipe\.yaml, line 2, `modle`: unknown top-level key 'modle'",
            "valid: seed_everything, trainer, model, data, optimizer, lr_scheduler, ckpt_path",
            r"HINT: did you mean `model`\?",
        ],
    ),
    "duplicate-key": (
        """
        trainer:
          callbacks: []
          max_epochs: 2
          callbacks: [{class_path: ModelCheckpoint}]
        """,
        [r"recipe\.yaml, line 4, `trainer\.callbacks`: duplicate key 'callbacks' \(first at line 2\)"],
    ),
    "trainer-not-a-mapping": (
        "trainer: [ModelCheckpoint]\n",
        [r"recipe\.yaml, line 1, `trainer`: `trainer` must be a mapping", r"\['ModelCheckpoint'\] \(list\)"],
    ),
    "unknown-trainer-argument": (
        """
        trainer:
          max_epoch: 3
        """,
        [
            r"recipe\.yaml, line 2, `trainer\.max_epoch`: unknown Trainer argument 'max_epoch'",
            "max_steps",
            r"HINT: did you mean `max_epochs`",
        ],
    ),
    "callbacks-not-a-list": (
        """
        trainer:
          callbacks:
            class_path: ModelCheckpoint
        """,
        [
            r"recipe\.yaml, line 2, `trainer\.callbacks`: `trainer\.callbacks` must be a list",
            r"\(mapping\)",
            "HINT: start each entry with '- '",
        ],
    ),
    "entry-not-a-mapping": (
        """
        trainer:
          callbacks:
            - ModelCheckpoint
        """,
        [
            r"recipe\.yaml, line 3, `trainer\.callbacks\[0\]`: a callback entry must be a mapping",
            "HINT: write `- class_path: ModelCheckpoint`",
        ],
    ),
    "entry-missing-class-path": (
        """
        trainer:
          callbacks:
            - class_path: ModelCheckpoint
            - init_args: {monitor: val_loss}
        """,
        [r"recipe\.yaml, line 4, `trainer\.callbacks\[1\]`: the callback entry has no `class_path`"],
    ),
    "entry-unknown-key": (
        """
        trainer:
          callbacks:
            - class_path: ModelCheckpoint
              init_arg: {monitor: val_loss}
        """,
        [
            r"recipe\.yaml, line 4, `trainer\.callbacks\[0\]\.init_arg`: unknown callback entry key 'init_arg'",
            "valid: class_path, init_args",
            r"HINT: did you mean `init_args`\?",
        ],
    ),
    "class-path-not-a-string": (
        """
        trainer:
          callbacks:
            - class_path: [ModelCheckpoint]
        """,
        [r"recipe\.yaml, line 3, `trainer\.callbacks\[0\]\.class_path`: `class_path` must be a string"],
    ),
    "unknown-short-name": (
        """
        trainer:
          callbacks:
            - class_path: ModelCheckpont
        """,
        [
            r"recipe\.yaml, line 3, `trainer\.callbacks\[0\]\.class_path`: unknown callback class 'ModelCheckpont'",
            "EarlyStopping",
            r"HINT: did you mean `ModelCheckpoint`",
        ],
    ),
    "unknown-class-in-allowed-module": (
        """
        trainer:
          callbacks:
            - class_path: ModelCheckpoint
            - class_path: pytorch_lightning.callbacks.EarlyStoping
              init_args: {monitor: val_loss}
        """,
        [
            r"recipe\.yaml, line 4, `trainer\.callbacks\[1\]\.class_path`: unknown callback class "
            r"'pytorch_lightning\.callbacks\.EarlyStoping'",
            "has no attribute 'EarlyStoping'",
            r"HINT: did you mean `pytorch_lightning\.callbacks\.EarlyStopping`\?",
        ],
    ),
    "os-system-outside-allow-list": (
        """
        trainer:
          callbacks:
            - class_path: os.system
              init_args: {command: "touch {marker}"}
        """,
        [
            r"recipe\.yaml, line 3, `trainer\.callbacks\[0\]\.class_path`: class 'os\.system' is outside the allowed "
            r"packages \(lightning_compress\., pytorch_lightning\.callbacks\.\); it was not imported"
        ],
    ),
    "subprocess-popen-outside-allow-list": (
        """
        trainer:
          callbacks:
            - class_path: subprocess.Popen
              init_args: {args: [touch, "{marker}"]}
        """,
        [r"recipe\.yaml, line 3, .*class 'subprocess\.Popen' is outside the allowed packages"],
    ),
    "python-tag-refused-by-safe-loader": (
        """
        trainer:
          callbacks:
            - !!python/object/apply:os.system ["touch {marker}"]
        """,
        [r"recipe\.yaml, line 3: the YAML tag `!!python/object/apply:os\.system` is not allowed", "SafeLoader"],
    ),
    "private-class-path": (
        """
        trainer:
          callbacks:
            - class_path: lightning_compress._lightning.Callback
        """,
        [
            r"recipe\.yaml, line 3, .*: class path 'lightning_compress\._lightning\.Callback' has private part\(s\) "
            r"_lightning",
            "public classes only",
        ],
    ),
    "class-not-a-callback": (
        """
        trainer:
          callbacks:
            - class_path: lightning_compress.recipes.RecipeError
        """,
        [
            r"recipe\.yaml, line 3, .*'lightning_compress\.recipes\.RecipeError' is not a Lightning Callback",
            "it was not instantiated",
        ],
    ),
    "lightning-class-not-a-callback": (
        """
        trainer:
          callbacks:
            - class_path: pytorch_lightning.callbacks.progress.tqdm_progress.Tqdm
        """,
        [
            r"recipe\.yaml, line 3, .*'pytorch_lightning\.callbacks\.progress\.tqdm_progress\.Tqdm' is not a "
            "Lightning Callback"
        ],
    ),
    "function-not-a-class": (
        """
        trainer:
          callbacks:
            - class_path: lightning_compress.recipes.load_recipe
              init_args: {path: "{marker}"}
        """,
        [
            r"recipe\.yaml, line 3, .*'lightning_compress\.recipes\.load_recipe' is a function, not a class",
            "it was not called",
        ],
    ),
    "module-reached-through-an-allowed-one": (
        """
        trainer:
          callbacks:
            - class_path: lightning_compress.recipes.os.system
              init_args: {command: "touch {marker}"}
        """,
        [r"recipe\.yaml, line 3, .*passes through the module 'os'"],
    ),
    "init-args-not-a-mapping": (
        """
        trainer:
          callbacks:
            - class_path: EarlyStopping
              init_args: [val_loss, 3]
        """,
        [
            r"recipe\.yaml, line 4, `trainer\.callbacks\[0\]\.init_args`: `init_args` must be a mapping",
            r"\['val_loss', 3\] \(list\)",
        ],
    ),
    "unknown-init-argument": (
        """
        trainer:
          callbacks:
            - class_path: EarlyStopping
              init_args:
                monitor: val_loss
                patiense: 3
        """,
        [
            r"recipe\.yaml, line 6, `trainer\.callbacks\[0\]\.init_args\.patiense`: EarlyStopping has no argument "
            "'patiense'",
            "valid arguments: monitor, min_delta, patience, ",
            r"HINT: did you mean `patience`\?",
        ],
    ),
    "missing-required-argument": (
        """
        trainer:
          callbacks:
            - class_path: EarlyStopping
              init_args: {patience: 3}
        """,
        [r"recipe\.yaml, line 4, `trainer\.callbacks\[0\]\.init_args`: EarlyStopping requires argument\(s\) monitor"],
    ),
    "wrong-type-str-for-int": (
        """
        trainer:
          callbacks:
            - class_path: pytorch_lightning.callbacks.EarlyStopping
              init_args:
                monitor: val_loss
                patience: three
        """,
        [
            r"recipe\.yaml, line 6, `trainer\.callbacks\[0\]\.init_args\.patience`: EarlyStopping argument `patience` "
            r"expects int, got 'three' \(str\)"
        ],
    ),
    "wrong-type-bool-for-int": (
        """
        trainer:
          callbacks:
            - class_path: ModelCheckpoint
              init_args: {save_top_k: true}
        """,
        [
            r"recipe\.yaml, line 4, `trainer\.callbacks\[0\]\.init_args\.save_top_k`: .*expects int, got True \(bool\)",
            "HINT: true/false are booleans; write a number",
        ],
    ),
    "wrong-type-yaml-1.1-float": (
        """
        trainer:
          callbacks:
            - class_path: EarlyStopping
              init_args: {monitor: val_loss, min_delta: 1e-3}
        """,
        [
            r"line 4, `trainer\.callbacks\[0\]\.init_args\.min_delta`: .*expects float, got '1e-3' \(str\)",
            r"HINT: .*1\.0e-3",
        ],
    ),
    "wrong-literal": (
        """
        trainer:
          callbacks:
            - class_path: LearningRateMonitor
              init_args: {logging_interval: epochs}
        """,
        [
            r"line 4, .*`logging_interval` expects 'step' \| 'epoch' \| null, got 'epochs' \(str\)",
            r"HINT: did you mean 'epoch'\?",
        ],
    ),
    "quoted-number-in-init-args": (
        """
        trainer:
          callbacks:
            - class_path: EarlyStopping
              init_args: {monitor: val_loss, patience: '3'}
        """,
        [
            r"recipe\.yaml, line 4, `trainer\.callbacks\[0\]\.init_args\.patience`: EarlyStopping argument `patience` "
            r"expects int, got '3' \(str\)",
            "HINT: remove the quotes to pass a number",
        ],
    ),
    "callable-argument-outside-allow-list": (
        """
        trainer:
          callbacks:
            - class_path: LambdaCallback
              init_args: {on_fit_start: os.system}
        """,
        [
            r"recipe\.yaml, line 4, `trainer\.callbacks\[0\]\.init_args\.on_fit_start`: 'os\.system' names "
            r"something outside the allowed packages \(lightning_compress\., pytorch_lightning\.callbacks\., "
            r"pytorch_lightning\.\)",
            r"HINT: If you trust `os`",
        ],
    ),
    "trainer-argument-wrong-type": (
        """
        trainer:
          max_epochs: three
        """,
        [
            r"recipe\.yaml, line 2, `trainer\.max_epochs`: Trainer argument `max_epochs` expects int \| null, "
            r"got 'three' \(str\)"
        ],
    ),
    "trainer-argument-wrong-literal": (
        """
        trainer:
          precision: 17
        """,
        [
            r"recipe\.yaml, line 2, `trainer\.precision`: Trainer argument `precision` expects 64 \| 32 \| 16 \| "
            r"'transformer-engine'.* \| null, got 17 \(int\)"
        ],
    ),
    "trainer-logger-argument-unknown": (
        """
        trainer:
          logger:
            class_path: pytorch_lightning.loggers.CSVLogger
            init_args: {save_dir: logs, bogus: 1}
        """,
        [
            r"recipe\.yaml, line 2, `trainer\.logger`: Trainer argument `logger` expects Logger \| list\[Logger\] "
            r"\| bool \| null, got \{'class_path': .*LightningCLI's parser says: Problem with given class_path "
            r"'pytorch_lightning\.loggers\.CSVLogger': Option 'bogus' is not accepted"
        ],
    ),
    "trainer-class-path-outside-allow-list": (
        """
        trainer:
          logger:
            class_path: subprocess.Popen
            init_args: {args: [touch, "{marker}"]}
        """,
        [
            r"recipe\.yaml, line 3, `trainer\.logger\.class_path`: class 'subprocess\.Popen' is outside the "
            r"allowed packages \(lightning_compress\., pytorch_lightning\.callbacks\., pytorch_lightning\.\); "
            "it was not imported"
        ],
    ),
    "trainer-class-path-private": (
        """
        trainer:
          profiler: {class_path: pytorch_lightning.profilers._private.Profiler}
        """,
        [r"recipe\.yaml, line 2, `trainer\.profiler\.class_path`: class path .* has private part\(s\) _private"],
    ),
    "nested-too-deep": (
        "trainer:\n  plugins: " + "[" * 70 + "]" * 70 + "\n",
        [
            r"recipe\.yaml, line 2, `trainer\.plugins\[0\]\[0\]\[0\]\[0\]\[0\]`: "
            "holds values nested more than 64 levels deep"
        ],
    ),
    "alias-that-contains-itself": (
        """
        trainer:
          plugins: &loop [SLURMEnvironment, *loop]
        """,
        [r"recipe\.yaml, line 2, `trainer\.plugins\[1\]`: a YAML alias refers to a node that contains it"],
    ),
    "aliases-blow-up-the-trainer-section": (
        "model:\n"
        + "".join(
            f"  a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]\n" if i else "  a0: &a0 [1, 2, 3, 4, 5]\n"
            for i in range(6)
        )
        + "trainer:\n  plugins: *a5\n",
        [
            r"recipe\.yaml, line 8, `trainer`: `trainer` holds more than 10,000 values once its YAML aliases are "
            "expanded"
        ],
    ),
    "integer-too-long-for-python": (
        "trainer:\n  max_epochs: " + "9" * 5000 + "\n",
        [r"recipe\.yaml, line 2, `trainer\.max_epochs`: an integer of 5,000 digits; Python reads at most 4,300"],
    ),
    "control-character": (
        "trainer:\n  max_epochs: 3\x1f\n",
        [
            r"recipe\.yaml, line 2: not valid YAML: character #x001f is not allowed",
            "HINT: remove the control character",
        ],
    ),
    "constructor-raises": (
        """
        trainer:
          callbacks:
            - class_path: ModelCheckpoint
            - class_path: EarlyStopping
              init_args: {monitor: val_loss, mode: sideways}
        """,
        [
            r"recipe\.yaml, line 4, `trainer\.callbacks\[1\]`: pytorch_lightning\.callbacks\.EarlyStopping\(\.\.\.\) "
            "raised MisconfigurationException",
            "`mode` can be min, max, got sideways",
        ],
    ),
}


@pytest.mark.parametrize("text, patterns", BAD_RECIPES.values(), ids=BAD_RECIPES.keys())
def test_bad_recipe_is_refused_with_a_clear_message(tmp_path: Path, text: str | None, patterns: list[str]) -> None:
    marker = tmp_path / "executed"
    if text is MISSING or text == DIRECTORY:
        recipe = tmp_path / "recipe.yaml"
        if text == DIRECTORY:
            recipe.mkdir()
    else:
        recipe = write(tmp_path, text.replace("{marker}", str(marker)))

    with pytest.raises(RecipeError, match=patterns[0]) as info:
        load_recipe(recipe)

    message = str(info.value)
    assert message.startswith(str(recipe))
    for pattern in patterns[1:]:
        assert re.search(pattern, message), f"{pattern!r} not in:\n{message}"
    assert not marker.exists(), "something named in the recipe was executed"


def test_constructor_error_is_chained(tmp_path: Path) -> None:
    recipe = write(
        tmp_path, "trainer:\n  callbacks:\n    - {class_path: EarlyStopping, init_args: {monitor: x, mode: up}}"
    )
    with pytest.raises(RecipeError) as info:
        load_recipe(recipe)
    assert type(info.value.__cause__).__name__ == "MisconfigurationException"


def test_missing_file(tmp_path: Path) -> None:
    write(tmp_path, "trainer: {}\n", name="recipe.yml")
    missing = tmp_path / "recipe.yaml"
    with pytest.raises(RecipeError, match=rf"^{re.escape(str(missing))}: recipe file not found") as info:
        load_recipe(missing)
    assert re.search(r"HINT: did you mean `.*recipe\.yml`\?", str(info.value))


def test_directory_instead_of_file(tmp_path: Path) -> None:
    write(tmp_path, "trainer: {}\n", name="prune.yaml")
    with pytest.raises(RecipeError, match=rf"^{re.escape(str(tmp_path))}: is a directory, not a recipe file") as info:
        load_recipe(tmp_path)
    assert "prune.yaml" in str(info.value)


def test_class_outside_the_allow_list_is_never_imported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    marker = tmp_path / "imported"
    (tmp_path / "evil_callbacks.py").write_text(f"open({str(marker)!r}, 'w').close()\n", encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    recipe = write(tmp_path, "trainer:\n  callbacks:\n    - class_path: evil_callbacks.Anything\n")

    with pytest.raises(RecipeError, match=r"line 3, .*class 'evil_callbacks\.Anything' is outside the allowed"):
        load_recipe(recipe)
    assert not marker.exists()


@pytest.mark.parametrize(
    "init_args, patterns",
    [
        ("{steps: 2.0}", [r"init_args\.steps`: AnnotatedCallback argument `steps` expects int, got 2\.0 \(float\)"]),
        ("{steps: 1, mode: quick}", [r"`mode` expects 'fast' \| 'slow', got 'quick'"]),
        ("{steps: 1, include: [conv, 3]}", [r"init_args\.include\[1\]`: .*`include` item \[1\] expects str, got 3"]),
        ("{steps: 1, include: conv}", [r"`include` expects list\[str\] \| null", r"HINT: write a list, .*\['conv'\]"]),
        ("{steps: 1, enabled: 'yes'}", [r"`enabled` expects bool, got 'yes' \(str\)"]),
        ("{steps: 1, output: 3}", [r"`output` expects path \(str\) \| null, got 3 \(int\)"]),
        ("{mode: slow}", [r"AnnotatedCallback requires argument\(s\) steps"]),
    ],
    ids=["float-for-int", "literal", "list-item", "str-for-list", "quoted-bool", "int-for-path", "missing"],
)
def test_string_annotations_are_resolved_and_checked(tmp_path: Path, init_args: str, patterns: list[str]) -> None:
    recipe = write(
        tmp_path, f"trainer:\n  callbacks:\n    - class_path: {HERE}.AnnotatedCallback\n      init_args: {init_args}\n"
    )
    with pytest.raises(RecipeError, match=patterns[0]) as info:
        load_recipe(recipe, extra_allowed_prefixes=[HERE])
    for pattern in patterns[1:]:
        assert re.search(pattern, str(info.value)), f"{pattern!r} not in:\n{info.value}"


def test_an_unquoted_n_m_pattern_gets_a_hint_about_yaml_base_60(tmp_path: Path) -> None:
    """YAML 1.1 reads `2:4` as 124; the error must say so, not suggest quoting '124'."""
    recipe = tmp_path / "nm.yaml"
    recipe.write_text(
        "trainer:\n  callbacks:\n    - class_path: GradualPruning\n      init_args: {pattern: 2:4, end_step: 10}\n"
    )
    hint = r"line 4.*expects str, got 124 \(int\)\nHINT: YAML 1.1 reads 2:4 as the base-60"
    with pytest.raises(RecipeError, match=hint):
        load_recipe(recipe)


# ------------------------------------------------------------------------------------------------ jsonargparse
# The trainer section is typed by LightningCLI's own parser, so what load_recipe accepts, LightningCLI accepts.

REPO = Path(__file__).resolve().parent.parent


def lightning_cli_accepts(trainer: dict[str, object]) -> bool:
    """Whether the parser LightningCLI builds (`add_lightning_class_args(Trainer, "trainer")`) takes `trainer`."""
    from lightning_compress._lightning import Trainer, submodule

    parser = submodule("cli").LightningArgumentParser(exit_on_error=False)
    parser.add_lightning_class_args(Trainer, "trainer")
    try:
        parser.parse_object({"trainer": trainer})
    except Exception:  # noqa: BLE001 - any refusal
        return False
    return True


AGREEMENT = {
    **{path.name: path.read_text(encoding="utf-8") for path in sorted((REPO / "recipes").glob("*.yaml"))},
    "lightning-extras": """
        trainer:
          max_epochs: '3'            # LightningCLI reads a quoted number of a Trainer argument as the number
          precision: 16-mixed
          plugins: [SLURMEnvironment]
          logger: {class_path: pytorch_lightning.loggers.CSVLogger, init_args: {save_dir: logs}}
          callbacks:
            - {class_path: ModelCheckpoint, init_args: {monitor: val_loss, save_top_k: 2}}
        """,
    "trainer-wrong-type": "trainer:\n  max_epochs: three\n",
    "trainer-nan": "trainer:\n  max_epochs: .nan\n",
    "callback-wrong-type": "trainer:\n  callbacks:\n    - {class_path: ModelCheckpoint, init_args: {save_top_k: 2.}}\n",
    "callback-wrong-literal": "trainer:\n  callbacks:\n    - {class_path: GradualPruning, init_args: {schedule: x}}\n",
    "logger-unknown-argument": "trainer:\n  logger: {class_path: CSVLogger, init_args: {save_dir: x, bogus: 1}}\n",
}


@pytest.mark.parametrize("text", AGREEMENT.values(), ids=AGREEMENT.keys())
def test_load_recipe_accepts_what_lightning_clis_parser_accepts(tmp_path: Path, text: str) -> None:
    recipe = write(tmp_path, text)
    try:
        validate_recipe_file(recipe, construct=False)
    except RecipeError:
        accepted = False
    else:
        accepted = True
    # LightningCLI reads the file as written: short class names resolve among the Callback classes imported
    assert accepted == lightning_cli_accepts(yaml.safe_load(recipe.read_text())["trainer"])


def test_the_trainer_section_may_name_lightnings_own_classes(tmp_path: Path) -> None:
    recipe = write(tmp_path, AGREEMENT["lightning-extras"])
    (checkpoint,) = load_recipe(recipe)
    assert isinstance(checkpoint, ModelCheckpoint) and checkpoint.save_top_k == 2


@pytest.mark.parametrize(
    "trainer",
    [
        "logger: evil_strings.Logger",  # a subclass type: jsonargparse would import the string
        "profiler: evil_strings.Profiler",  # Profiler | str: imported first, then taken as a string
        "plugins: [evil_strings.Plugin]",
        "callbacks:\n    - {class_path: LambdaCallback, init_args: {on_fit_start: evil_strings.run}}",
        "callbacks:\n    - {class_path: ModelPruning, init_args: {pruning_fn: evil_strings.prune}}",
    ],
    ids=["logger", "profiler", "plugins", "lambda-callable", "pruning-callable"],
)
def test_a_string_naming_a_module_outside_the_allow_list_is_never_imported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, trainer: str
) -> None:
    marker = tmp_path / "imported"
    (tmp_path / "evil_strings.py").write_text(f"open({str(marker)!r}, 'w').close()\n", encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    recipe = write(tmp_path, f"trainer:\n  {trainer}\n")

    with pytest.raises(
        RecipeError, match=r"line [23], `trainer\.[a-z_.\[\]0-9]+`: 'evil_strings\.\w+' names something "
    ):
        load_recipe(recipe)
    assert not marker.exists() and "evil_strings" not in __import__("sys").modules


def test_a_quoted_value_in_init_args_stays_a_string_where_lightning_cli_would_read_a_bool(tmp_path: Path) -> None:
    """jsonargparse (and so LightningCLI) reads 'yes' as True; a recipe refuses it, with the same words as 'three'."""
    recipe = write(
        tmp_path,
        f"trainer:\n  callbacks:\n    - class_path: {HERE}.AnnotatedCallback\n"
        "      init_args: {steps: 1, enabled: 'yes'}\n",
    )
    with pytest.raises(RecipeError, match=r"line 4, `trainer\.callbacks\[0\]\.init_args\.enabled`: .*expects bool"):
        load_recipe(recipe, extra_allowed_prefixes=[HERE])


def test_under_the_lightning_namespace_short_names_resolve_to_lightning_pytorch(tmp_path: Path) -> None:
    recipe = write(
        tmp_path, "trainer:\n  callbacks:\n    - {class_path: ModelCheckpoint, init_args: {monitor: loss}}\n"
    )
    script = textwrap.dedent(f"""
        import sys
        import lightning.pytorch
        from lightning_compress import load_recipe
        from lightning_compress.recipes import ALLOWED_PREFIXES, validate_recipe_file

        (callback,) = load_recipe({str(recipe)!r})
        (entry,) = validate_recipe_file({str(recipe)!r})["trainer"]["callbacks"]
        assert entry["class_path"] == "lightning.pytorch.callbacks.ModelCheckpoint", entry
        assert isinstance(callback, lightning.pytorch.Callback), type(callback).__mro__
        assert type(callback).__module__.startswith("lightning.pytorch.callbacks."), type(callback)
        assert ALLOWED_PREFIXES == ("lightning_compress.", "lightning.pytorch.callbacks."), ALLOWED_PREFIXES
        assert "pytorch_lightning" not in sys.modules, "the other namespace was imported"
        print("ok")
    """)
    import os
    import subprocess
    import sys

    env = {**os.environ, "LIGHTNING_COMPRESS_NAMESPACE": "lightning"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]
