"""The `lightning-compress` command: demo, recipes through LightningCLI, and refusals before any training."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_compress.cli import main
from lightning_compress.recipes import validate_recipe_file

REPO = Path(__file__).resolve().parent.parent
RECIPES = sorted((REPO / "recipes").glob("*.yaml"))
CONSOLE_SCRIPT = Path(sys.executable).with_name("lightning-compress")
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


@pytest.mark.slow
def test_demo_trains_dense_and_pruned_and_shows_the_savings(tmp_path: Path) -> None:
    proc = subprocess.run(
        [str(CONSOLE_SCRIPT), "demo", "--epochs", "4", "--no-progress", "--output-dir", "out"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {}
    for line in proc.stdout.splitlines():
        line = line.strip()
        cells = [c.strip() for c in line[1:-1].split("│")] if line.startswith("│") else []
        if len(cells) == 4:
            rows[cells[0]] = cells[1:]
    dense_acc, pruned_acc = (float(v.rstrip(" %")) for v in rows["test accuracy"][:2])
    assert dense_acc > 80.0 and pruned_acc > 50.0  # 10 classes: chance is 10 %
    assert rows["parameters"][:2] == ["53,002", "53,002"]  # the reference CNN on 8x8 inputs
    nonzeros = int(rows["non-zero parameters"][1].replace(",", ""))
    assert nonzeros < 0.2 * 53_002  # 90 % of the conv/linear weights are zero; biases stay
    assert float(rows["bytes on disk"][2].rstrip("x")) <= 0.2
    assert {"FLOPs per image (theoretical)", "latency per image, measured (ms)"} <= rows.keys()
    (run,) = (tmp_path / "out").iterdir()
    assert (run / "savings.png").read_bytes().startswith(b"\x89PNG")
    assert (run / "pruned_model.safetensors").stat().st_size == int(rows["bytes on disk"][1].replace(",", ""))


def test_demo_never_reuses_an_earlier_run_folder(tmp_path: Path) -> None:
    from lightning_compress.demo import new_output_dir

    first, second = new_output_dir(tmp_path), new_output_dir(tmp_path)
    assert first != second and first.is_dir() and second.is_dir()


def test_demo_rejects_too_few_epochs(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--epochs", "0"])
    assert exit_info.value.code == 2
    assert "--epochs must be an integer >= 2 (one to learn, one to prune and recover), got 0" in capsys.readouterr().err


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.name for p in RECIPES])
def test_every_shipped_recipe_passes_the_safe_loader(recipe: Path) -> None:
    config = validate_recipe_file(recipe)
    assert config["model"]["class_path"].startswith("lightning_compress.models.")


def test_fit_runs_a_recipe_and_writes_its_checkpoint(tmp_path: Path) -> None:
    main(
        [
            "fit",
            "--config",
            str(REPO / "recipes/digits_dense.yaml"),
            "--trainer.max_epochs=1",
            f"--trainer.default_root_dir={tmp_path}",
            *QUIET,
        ]
    )
    assert (tmp_path / "lightning_logs/version_0/checkpoints/last.ckpt").is_file()
    assert (tmp_path / "lightning_logs/version_0/config.yaml").is_file()


def test_fit_runs_the_pruning_recipe_and_checkpoints_a_90_percent_sparse_model(tmp_path: Path) -> None:
    main(["fit", "--config", str(REPO / "recipes/digits_gmp90.yaml"), f"--trainer.default_root_dir={tmp_path}", *QUIET])
    checkpoint = torch.load(tmp_path / "lightning_logs/version_0/checkpoints/last.ckpt", weights_only=False)
    weights = [t for k, t in checkpoint["state_dict"].items() if k.endswith("weight")]
    zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    assert zeros == pytest.approx(0.9, abs=0.005)
    assert any(key.startswith("GradualPruning") for key in checkpoint["callbacks"])


def test_the_qat_recipe_checkpoint_converts_to_an_int8_model_that_still_classifies(tmp_path: Path) -> None:
    """The documented route from a QAT recipe's checkpoint to an int8 model: prepare, load, convert."""
    from lightning_compress import QuantizationAwareTraining, convert_to_int8
    from lightning_compress.data import DigitsDataModule
    from lightning_compress.models import ImageClassifier
    from lightning_compress.quantization import Int8Linear

    main(["fit", "--config", str(REPO / "recipes/digits_qat8.yaml"), f"--trainer.default_root_dir={tmp_path}", *QUIET])
    checkpoint = torch.load(tmp_path / "lightning_logs/version_0/checkpoints/last.ckpt", weights_only=False)
    assert checkpoint["state_dict"]["net.fc1.fake_quant_enabled"]
    model = ImageClassifier(image_size=8)
    QuantizationAwareTraining(8, 8).prepare(model)
    model.load_state_dict(checkpoint["state_dict"])
    int8 = convert_to_int8(model)
    assert isinstance(int8.net.fc1, Int8Linear)
    data = DigitsDataModule()
    data.setup("validate")
    images, labels = (torch.cat(parts) for parts in zip(*data.val_dataloader(), strict=True))
    with torch.no_grad():
        accuracy = (int8(images).argmax(1) == labels).float().mean()
    assert accuracy > 0.9


def test_the_lowrank_recipe_checkpoint_truncates_to_a_smaller_model_that_still_classifies(tmp_path: Path) -> None:
    """The documented route from a low-rank recipe's checkpoint to the small model: prepare, load, truncate."""
    from lightning_compress import LowRankRefactoring
    from lightning_compress.data import DigitsDataModule
    from lightning_compress.models import ImageClassifier

    recipe = REPO / "recipes/digits_lowrank.yaml"
    main(["fit", "--config", str(recipe), f"--trainer.default_root_dir={tmp_path}", *QUIET])
    checkpoint = torch.load(tmp_path / "lightning_logs/version_0/checkpoints/last.ckpt", weights_only=False)
    model = ImageClassifier(image_size=8)
    # the recipe's arguments: with calibration the targets come from the data, so every layer that can shrink is
    # factorised at setup, whatever its initial spectrum
    lowrank = LowRankRefactoring(param_budget=0.4, calibration_steps=10, start_step=20, end_step=100)
    lowrank.prepare(model)
    model.load_state_dict(checkpoint["state_dict"])
    lowrank.truncate(model)
    dense_weights = 32 * 9 + 64 * 32 * 9 + 128 * 256 + 10 * 128
    factors = sum(p.numel() for n, p in model.named_parameters() if n.endswith(("first", "second")))
    assert factors <= 0.4 * dense_weights
    data = DigitsDataModule()
    data.setup("validate")
    images, labels = (torch.cat(parts) for parts in zip(*data.val_dataloader(), strict=True))
    with torch.no_grad():
        accuracy = (model.eval()(images).argmax(1) == labels).float().mean()
    assert accuracy > 0.85


@pytest.mark.slow
def test_fit_runs_the_fashion_mnist_recipe_on_the_real_data(tmp_path: Path) -> None:
    main(
        [
            "fit",
            "--config",
            str(REPO / "recipes/fashion_mnist_dense.yaml"),
            "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=5",
            "--trainer.limit_val_batches=2",
            f"--trainer.default_root_dir={tmp_path}",
            *QUIET,
        ]
    )
    assert (tmp_path / "lightning_logs/version_0/checkpoints/last.ckpt").is_file()


def test_fit_refuses_an_unsafe_recipe_before_anything_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    marker = tmp_path / "executed"
    recipe = tmp_path / "evil.yaml"
    recipe.write_text(
        "trainer:\n"
        f"  default_root_dir: {tmp_path}\n"
        "  callbacks:\n"
        "    - class_path: os.system\n"
        f"      init_args: {{command: 'touch {marker}'}}\n"
        "model: {class_path: lightning_compress.models.ImageClassifier, init_args: {image_size: 8}}\n"
        "data: {class_path: lightning_compress.data.DigitsDataModule}\n"
    )
    assert main(["fit", "--config", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "evil.yaml, line 4" in err and "outside the allowed packages" in err
    assert not marker.exists()
    assert not (tmp_path / "lightning_logs").exists()


def test_unknown_subcommand_lists_the_valid_ones(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["prune"]) == 2
    assert "unknown subcommand 'prune'; valid: demo, fit, validate, test, predict" in capsys.readouterr().out


def test_help_lists_demo_and_fit(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "demo" in out and "fit --config RECIPE.yaml" in out
