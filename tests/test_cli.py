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


DEMO_MODELS = ("dense (fp32)", "pruned 90%", "pruned 90% + int8", "low-rank (40% weights)")


def demo_rows(stdout: str) -> dict[str, list[str]]:
    """The body rows of the demo's table, by model: test accuracy, vs dense, bytes, vs dense, FLOPs, vs dense,
    latency (ms per image), speed-up."""
    rows = {}
    for line in stdout.splitlines():
        line = line.strip()
        cells = [c.strip() for c in line[1:-1].split("│")] if line.startswith("│") else []
        if len(cells) == 9:
            rows[cells[0]] = cells[1:]
    return rows


def number(cell: str) -> float:
    return float(cell.replace(",", "").rstrip(" %x"))


@pytest.mark.slow
def test_demo_trains_four_models_and_shows_what_each_saved_against_dense(tmp_path: Path) -> None:
    from lightning_compress import load_compressed
    from lightning_compress.data import DigitsDataModule
    from lightning_compress.demo_train import accuracy_on_test
    from lightning_compress.quantization import Int8Linear
    from lightning_compress.quantization.kernels import onednn_available

    proc = subprocess.run(
        [str(CONSOLE_SCRIPT), "demo", "--epochs", "4", "--no-progress", "--output-dir", "out"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = demo_rows(proc.stdout)
    assert tuple(rows) == DEMO_MODELS, proc.stdout
    dense, pruned, int8, lowrank = (rows[m] for m in DEMO_MODELS)
    accuracy = {m: number(rows[m][0]) for m in DEMO_MODELS}
    assert accuracy["dense (fp32)"] > 90.0  # 10 classes: chance is 10 %
    for model in DEMO_MODELS[1:]:  # compression costs at most a few points, even in 4 epochs
        assert accuracy[model] > accuracy["dense (fp32)"] - 6.0, rows
        assert number(rows[model][1]) == pytest.approx(accuracy[model] - accuracy["dense (fp32)"], abs=0.011)
    bytes_on_disk = {m: int(number(rows[m][2])) for m in DEMO_MODELS}
    assert bytes_on_disk["pruned 90% + int8"] < bytes_on_disk["pruned 90%"] < 0.2 * bytes_on_disk["dense (fp32)"]
    assert bytes_on_disk["low-rank (40% weights)"] < 0.5 * bytes_on_disk["dense (fp32)"]
    assert [r[3] for r in (dense, pruned, int8)] == [
        "1.00x",
        f"{bytes_on_disk['pruned 90%'] / bytes_on_disk['dense (fp32)']:.2f}x",
        f"{bytes_on_disk['pruned 90% + int8'] / bytes_on_disk['dense (fp32)']:.2f}x",
    ]
    assert number(pruned[5]) < 0.25 and number(int8[5]) < 0.25 and number(lowrank[5]) < 1.0  # theoretical FLOPs
    latency = {m: number(rows[m][6]) for m in DEMO_MODELS}
    assert number(int8[7]) == pytest.approx(latency["dense (fp32)"] / latency["pruned 90% + int8"], rel=0.02)
    if onednn_available(torch.device("cpu")):  # the int8 layers run integer kernels: a real speed-up, measured
        assert number(int8[7]) > 1.5, rows
    (run,) = (tmp_path / "out").iterdir()
    assert (run / "savings.png").read_bytes().startswith(b"\x89PNG")
    files = ("dense_model.pt", "pruned_model.safetensors", "int8_model.safetensors", "lowrank_model.safetensors")
    assert [(run / f).stat().st_size for f in files] == [bytes_on_disk[m] for m in DEMO_MODELS]
    reloaded = load_compressed(run / "int8_model.safetensors")  # the file is the int8 model that was measured
    assert isinstance(reloaded.net.fc1, Int8Linear)
    assert 100 * accuracy_on_test(reloaded, DigitsDataModule()) == pytest.approx(
        accuracy["pruned 90% + int8"], abs=0.01
    )


def test_demo_schedules_fit_inside_the_shortest_run() -> None:
    """--epochs 2 (38 steps): pruning starts after a few dense steps and ends before the run does; QAT switches on
    after pruning has started and freezes its observers before the end; low-rank calibrates before its cut."""
    from lightning_compress import GradientClipping, GradualPruning, LowRankRefactoring, QuantizationAwareTraining
    from lightning_compress.demo_train import callbacks_for

    assert callbacks_for("dense", 38, 0.9) == []
    pruning, qat, clipping = callbacks_for("int8", 38, 0.9)
    assert isinstance(pruning, GradualPruning) and isinstance(qat, QuantizationAwareTraining)
    assert isinstance(clipping, GradientClipping) and (clipping.mode, clipping.max_norm) == ("norm", 1.0)
    assert 0 < pruning.start_step < qat.start_step < pruning.end_step < qat.freeze_observers_step < 38
    assert (qat.weight_bits, qat.activation_bits, pruning.target_sparsity) == (8, 8, 0.9)
    (lowrank,) = callbacks_for("lowrank", 38, 0.9)
    assert isinstance(lowrank, LowRankRefactoring)
    assert 0 < lowrank.calibration_steps <= lowrank.start_step < lowrank.end_step < 38


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
