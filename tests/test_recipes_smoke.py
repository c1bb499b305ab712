"""Every recipe in recipes/ runs: a few steps of `lightning-compress fit --config` with its schedule shrunk into them.

A recipe is checked for its file format elsewhere (test_recipes.py, test_cli.py's safe-loader test); here each one
trains. Its copy keeps every class and argument and moves each step argument (starts, ends, freezes, intervals,
warm-ups) proportionally into a window of ``STEPS`` optimizer steps, so every technique acts; a QAT callback also
writes its int8 export. The run goes through the command's own entry point (in this process), with every output
(checkpoints, logs, the export) under ``tmp_path``, and the assertions read what the run left: the last checkpoint
(global step, each callback's state, the model's weights and flags) and the export.
"""

from __future__ import annotations

import copy
import importlib
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from lightning_compress import load_compressed
from lightning_compress.cli import main
from lightning_compress.recipes import validate_recipe_file

REPO = Path(__file__).resolve().parent.parent
RECIPES = sorted((REPO / "recipes").glob("*.yaml"))
STEPS = 12
#: Arguments that name a step of the schedule; the latest of them is moved to step STEPS - 2.
POINTS = ("start_step", "end_step", "freeze_observers_step", "freeze_bn_step", "rewind_step")
#: Arguments that count steps; shrunk by the same factor, to 1 step at least.
DURATIONS = ("update_every", "calibration_steps", "warmup_steps", "rewarm_steps", "event_steps")
OVERRIDES = [
    "--trainer.max_epochs=1",
    f"--trainer.max_steps={STEPS}",
    f"--trainer.limit_train_batches={STEPS}",
    "--trainer.limit_val_batches=2",
    "--trainer.val_check_interval=1.0",
    "--trainer.num_sanity_val_steps=0",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
]


def shrunk(entries: list[dict[str, Any]], steps: int) -> list[dict[str, Any]]:
    """The callback entries with every step argument scaled so that the last scheduled point falls at ``steps - 2``."""
    points = [e["init_args"][k] for e in entries for k in POINTS if isinstance((e.get("init_args") or {}).get(k), int)]
    scale = (steps - 2) / max(points, default=steps - 2)
    out = []
    for entry in copy.deepcopy(entries):
        args = entry.setdefault("init_args", {}) or {}
        for key in POINTS + DURATIONS:
            if isinstance(args.get(key), int) and args[key] > 0:
                args[key] = max(1, round(args[key] * scale))
        if "end_step" in args and args["end_step"] <= args.get("start_step", 0):
            args["end_step"] = args.get("start_step", 0) + 1
        entry["init_args"] = args
        out.append(entry)
    return out


def smoke_copy(recipe: Path, folder: Path) -> tuple[Path, dict[str, dict[str, Any]]]:
    """The recipe with its schedule shrunk and any export written into ``folder``; its callbacks by class name."""
    config = validate_recipe_file(recipe)
    entries = shrunk(config["trainer"].get("callbacks") or [], STEPS)
    for entry in entries:
        if entry["class_path"].endswith(".QuantizationAwareTraining"):
            entry["init_args"]["export_path"] = str(folder / "export.lc")
    config["trainer"]["callbacks"] = entries
    path = folder / recipe.name
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path, {e["class_path"].rsplit(".", 1)[-1]: e["init_args"] for e in entries}


def skeleton(recipe: Path) -> torch.nn.Module:
    """A fresh instance of the recipe's model, built from its ``model`` section, for ``load_compressed``."""
    section = yaml.safe_load(recipe.read_text())["model"]
    module, name = section["class_path"].rsplit(".", 1)
    return getattr(importlib.import_module(module), name)(**(section.get("init_args") or {}))


def state_of(checkpoint: dict[str, Any], name: str) -> dict[str, Any]:
    (state,) = [s for key, s in checkpoint["callbacks"].items() if key.startswith(name)]
    return state


def target_sparsity(args: dict[str, Any]) -> float:
    pattern = str(args.get("pattern", "unstructured"))
    if ":" in pattern:
        n, m = (int(v) for v in pattern.split(":"))
        return 1 - n / m
    return float(args["target_sparsity"])


def nm_groups_respected(weight: torch.Tensor, pattern: str) -> bool:
    """At most N non-zeros in every M consecutive weights along the input dimension (a conv's input channels)."""
    n, m = (int(v) for v in pattern.split(":"))
    along_input = weight if weight.dim() == 2 else weight.flatten(2).transpose(1, 2)  # conv: [out, kernel, in]
    return bool(((along_input.reshape(-1, m) != 0).sum(-1) <= n).all())


@pytest.mark.slow
@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_every_recipe_fits_and_every_technique_acts(
    recipe: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # a relative path a recipe names lands here, not in the checkout
    smoke, callbacks = smoke_copy(recipe, tmp_path)

    assert main(["fit", "--config", str(smoke), f"--trainer.default_root_dir={tmp_path / 'run'}", *OVERRIDES]) == 0

    checkpoints = sorted((tmp_path / "run").rglob("*.ckpt"), key=lambda p: p.name != "last.ckpt")
    assert checkpoints, "the fit wrote no checkpoint"
    checkpoint = torch.load(checkpoints[0], map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == STEPS
    weights = checkpoint["state_dict"]

    if "LowRankRefactoring" in callbacks:
        ranks = state_of(checkpoint, "LowRankRefactoring")["target_ranks"]
        assert ranks, "LowRankRefactoring factorised no layer"
        for layer, rank in ranks.items():  # the end step lies in the window: every rank mask is at its target
            mask = weights[f"{layer}.rank_mask"]
            assert int(mask.sum()) == rank < mask.numel()
    if (args := callbacks.get("GradualPruning")) is not None:
        masks = state_of(checkpoint, "GradualPruning")["masks"]
        pruned = {name: weights[name] for name in masks if name.endswith("weight")}
        assert pruned, "GradualPruning masked no weight"
        zeros = sum(int((w == 0).sum()) for w in pruned.values()) / sum(w.numel() for w in pruned.values())
        assert zeros >= target_sparsity(args) - 0.01
        if ":" in str(args.get("pattern", "")):
            assert all(nm_groups_respected(w, args["pattern"]) for w in pruned.values())
    if (args := callbacks.get("QuantizationAwareTraining")) is not None:
        flags = {k: bool(v) for k, v in weights.items() if k.endswith("fake_quant_enabled")}
        assert flags and all(flags.values()), "fake quantization is not on in every QAT layer"
        if args.get("freeze_observers_step") is not None:
            observing = [k for k, v in weights.items() if k.endswith("observer.enabled") and bool(v)]
            assert observing == [], "observers still update after freeze_observers_step"
        int8 = load_compressed(tmp_path / "export.lc", model=skeleton(smoke))
        int8_layers = [m for m in int8.modules() if isinstance(getattr(m, "qweight", None), torch.Tensor)]
        assert len(int8_layers) >= len(flags)  # a factorised layer exports as two int8 factors
    compressed = {"LowRankRefactoring", "GradualPruning", "QuantizationAwareTraining"} & callbacks.keys()
    if (args := callbacks.get("GradientClipping")) is not None:
        state = state_of(checkpoint, "GradientClipping")
        assert state["skipped_steps"] == 0
        if args.get("mode") == "adaptive":  # the threshold is read from the norms of the latest steps
            assert state["norms"] and all(0 < norm < float("inf") for norm in state["norms"])
        if compressed and args.get("event_steps", 20):
            assert state["last_event_step"] is not None, "GradientClipping saw no compression event"
    if (args := callbacks.get("LearningRateWarmup")) is not None:
        state = state_of(checkpoint, "LearningRateWarmup")
        assert state["applied_steps"] == STEPS
        if compressed and args.get("rewarm_on", []) != [] and args.get("rewarm_steps", 100):
            assert state["last_event_step"] is not None, "LearningRateWarmup re-warmed after no event"
