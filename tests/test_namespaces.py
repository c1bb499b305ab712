"""Both Lightning namespaces: the same callbacks, monitor, W&B extras and recipes under `pytorch_lightning` and under
the unified `lightning` package (`lightning.pytorch`), chosen once in `lightning_compress._lightning`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

pytest.importorskip("lightning")

HARNESS = Path(__file__).resolve().parent / "harness"
REPO = HARNESS.parent.parent
NAMESPACES = {"lightning": "lightning.pytorch", "pytorch_lightning": "pytorch_lightning"}


def run(args: list[str], namespace: str | None, tmp_path: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "LIGHTNING_COMPRESS_NAMESPACE"}
    if namespace is not None:
        env["LIGHTNING_COMPRESS_NAMESPACE"] = namespace
    env.update(
        OMP_NUM_THREADS="1",
        WANDB_MODE="offline",
        WANDB_SILENT="true",
        HF_HUB_OFFLINE="1",
        PYTHONPATH=os.pathsep.join(filter(None, [str(HARNESS), env.get("PYTHONPATH")])),
        **{var: str(tmp_path / var.lower()) for var in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR")},
    )
    proc = subprocess.run(args, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{args} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def worker(kind: str, namespace: str, tmp_path: Path) -> dict[str, Any]:
    run([sys.executable, str(HARNESS / "namespace_worker.py"), kind, str(tmp_path)], namespace, tmp_path)
    return json.loads((tmp_path / "result.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("namespace", NAMESPACES)
def test_pruning_qat_and_the_monitor_run_under_either_namespace(namespace: str, tmp_path: Path) -> None:
    result = worker("fit", namespace, tmp_path)
    assert result["chosen"] == NAMESPACES[namespace]
    assert result["trainer_module"].startswith(NAMESPACES[namespace])
    assert result["callbacks_are_namespace_callbacks"]
    if namespace == "lightning":
        assert not result["pytorch_lightning_imported"]  # nothing of the other namespace was pulled in
    assert result["sparsity"] == pytest.approx(0.9, abs=0.005)
    assert result["qat_layers"] and result["int8_fc1"]
    assert {"compress/sparsity", "compress/params_effective", "compress/bytes_compressed"} <= set(result["logged"])
    assert {"stabilize/grad_norm", "stabilize/clip_threshold", "stabilize/lr_factor"} <= set(result["logged"])
    assert result["rewarm_start"] == 10 and result["hold_until"] == 10 + 3, "the stabilisers saw QAT's event"


@pytest.mark.slow
@pytest.mark.parametrize("namespace", NAMESPACES)
def test_the_wandb_extras_reach_a_wandb_logger_of_either_namespace(namespace: str, tmp_path: Path) -> None:
    result = worker("wandb", namespace, tmp_path)
    assert result["chosen"] == NAMESPACES[namespace]
    assert result["table_layers"] == ["net.conv1", "net.conv2", "net.fc1", "net.fc2"]  # the per-layer table
    assert result["summary_sparsity"] == pytest.approx(0.5, abs=0.01)
    assert result["defined_compress_metrics"]


@pytest.mark.slow
@pytest.mark.parametrize("namespace", NAMESPACES)
def test_a_recipe_runs_through_the_cli_under_either_namespace(namespace: str, tmp_path: Path) -> None:
    cli = Path(sys.executable).with_name("lightning-compress")
    recipe = ["fit", "--config", str(REPO / "recipes/digits_gmp90.yaml"), "--trainer.max_epochs=2"]
    quiet = ["--trainer.enable_progress_bar=false", "--trainer.logger=false"]
    code = (
        "import sys, lightning_compress._lightning as seam, lightning_compress.cli as cli;"
        " print('namespace', seam.NAMESPACE); sys.exit(cli.main(sys.argv[1:]))"
    )
    root = tmp_path / "main"
    proc = run([sys.executable, "-c", code, *recipe, *quiet, f"--trainer.default_root_dir={root}"], namespace, tmp_path)
    assert f"namespace {NAMESPACES[namespace]}" in proc.stdout
    assert list(root.rglob("last.ckpt")), proc.stdout[-2000:] + proc.stderr[-2000:]
    root = tmp_path / "script"  # the console script itself, as a user types it
    proc = run([str(cli), *recipe, *quiet, f"--trainer.default_root_dir={root}"], namespace, tmp_path)
    assert list(root.rglob("last.ckpt")), proc.stdout[-2000:] + proc.stderr[-2000:]


def test_importing_lightning_first_makes_it_the_namespace(tmp_path: Path) -> None:
    code = "import lightning, lightning_compress._lightning as seam, sys;"
    code += " print(seam.NAMESPACE, 'pytorch_lightning' in sys.modules)"
    assert run([sys.executable, "-c", code], None, tmp_path).stdout.split() == ["lightning.pytorch", "False"]
    code = "import lightning_compress._lightning as seam; print(seam.NAMESPACE)"
    assert run([sys.executable, "-c", code], None, tmp_path).stdout.split() == ["pytorch_lightning"]


def test_an_unknown_namespace_is_refused_with_the_valid_ones(tmp_path: Path) -> None:
    env = {**os.environ, "LIGHTNING_COMPRESS_NAMESPACE": "lightning2"}
    proc = subprocess.run([sys.executable, "-c", "import lightning_compress"], env=env, capture_output=True, text=True)
    assert proc.returncode != 0
    assert "`LIGHTNING_COMPRESS_NAMESPACE`='lightning2' is not a Lightning namespace; valid: 'pytorch_lightning'" in (
        proc.stderr
    )


@pytest.mark.parametrize("root", NAMESPACES.values())
def test_strategy_and_logger_checks_recognise_either_namespace(root: str, tmp_path: Path) -> None:
    import importlib

    from lightning_compress._lightning import loggers_of, uses_deepspeed

    strategies = importlib.import_module(f"{root}.strategies")
    loggers = importlib.import_module(f"{root}.loggers")
    assert uses_deepspeed(SimpleNamespace(strategy=strategies.DeepSpeedStrategy()))
    assert not uses_deepspeed(SimpleNamespace(strategy=strategies.DDPStrategy()))
    csv = loggers.CSVLogger(tmp_path)
    wandb_logger = loggers.WandbLogger(save_dir=str(tmp_path), offline=True)
    assert loggers_of(SimpleNamespace(loggers=[csv, wandb_logger]), "WandbLogger") == [wandb_logger]
