"""The benchmarks: every script imports and declares a tiny ``--smoke`` setting made of its own options; a smoke run
writes into a folder of its own, never over the committed ``benchmarks/results/``; the shared skeleton writes both
result files with the command that produced them; and every script's smoke run completes and writes results of the
same shape as the committed ones (same fields, for the configurations it ran).

The fast tests run the skeleton and the two cheapest scripts in this process; the slow ones run every script as its
command line does (``python benchmarks/<name>.py --smoke``), in a fresh process.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
COMMITTED = BENCHMARKS / "results"
sys.path.insert(0, str(BENCHMARKS))

import _common  # noqa: E402
import _models  # noqa: E402
import _timing  # noqa: E402

SCRIPTS = (
    "callback_hook_time",
    "composed_cnn",
    "gpu",
    "int8_speed",
    "lowrank_accuracy",
    "lowrank_speed",
    "lowrank_truncation",
    "pruning_accuracy",
    "pruning_step_time",
    "qat_accuracy",
    "stabilizer_overhead",
    "stabilizer_shock",
    "zero3_memory",
)
HAS_TORCHAO = importlib.util.find_spec("torchao") is not None


def fields(value: Any, path: str = "") -> set[str]:
    """Every key path of a JSON document (lists are values: raw per-step and per-round numbers)."""
    if not isinstance(value, dict):
        return set()
    return {f"{path}/{key}" for key in value} | {p for key, v in value.items() for p in fields(v, f"{path}/{key}")}


def missing_fields(name: str, new: dict[str, Any], not_run: set[str]) -> list[str]:
    """Fields of the committed ``<name>.json`` that ``new`` lacks, leaving out those of configurations (or variants)
    that the run did not run: any field a part of whose path starts with a name in ``not_run``."""
    committed = json.loads((COMMITTED / f"{name}.json").read_text())
    lacking = fields(committed) - fields(new)
    return sorted(p for p in lacking if not any(part.startswith(tuple(not_run)) for part in p.split("/")))


@pytest.fixture
def torch_threads():
    """The benchmarks set this process's torch threads; give them back afterwards."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


TOY = _common.Benchmark(
    "toy",
    "A toy benchmark.\n\nMore words.",
    shared={"configs": "a,b", "steps": 100, "threads": 1},
    options={"lr": (0.1, "learning rate"), "fast": (False, "go fast")},
    smoke={"steps": 2, "configs": "a"},
    choices={"configs": ("a", "b")},
)


# --- the skeleton -------------------------------------------------------------------------------------------------


def test_every_script_in_the_folder_is_listed_here() -> None:
    found = {path.stem for path in BENCHMARKS.glob("*.py") if not path.name.startswith("_")}
    assert found == set(SCRIPTS), "a new benchmark joins SCRIPTS (and gets a smoke test below)"


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_script_declares_itself_and_a_smoke_setting_of_its_own_options(name: str, torch_threads: None) -> None:
    module = importlib.import_module(name)
    benchmark = module.BENCHMARK
    assert benchmark.name == name and benchmark.script == f"benchmarks/{name}.py"
    options = {action.dest for action in benchmark.parser()._actions}
    assert {"name", "results_dir", "smoke"} <= options
    assert benchmark.smoke and set(benchmark.smoke) <= options, "every --smoke value sets an option of the script"

    full = benchmark.start([])
    assert (full.args.name, full.args.results_dir, full.args.smoke) == (name, COMMITTED, False)
    assert full.command.split()[1:] == [f"benchmarks/{name}.py"]

    smoke = benchmark.start(["--smoke"])
    assert {key: getattr(smoke.args, key) for key in benchmark.smoke} == benchmark.smoke
    assert smoke.args.results_dir.is_dir() and COMMITTED not in smoke.args.results_dir.parents
    assert smoke.args.results_dir != COMMITTED and not any(smoke.args.results_dir.iterdir())
    smoke.args.results_dir.rmdir()


def test_smoke_sets_the_tiny_values_and_the_command_line_still_wins(tmp_path: Path, torch_threads: None) -> None:
    assert TOY.start([]).args.steps == 100
    assert TOY.start(["--smoke", "--results-dir", str(tmp_path)]).args.steps == 2
    run = TOY.start(["--smoke", "--steps", "5", "--results-dir", str(tmp_path)])
    assert (run.args.steps, run.args.configs, run.args.results_dir) == (5, "a", tmp_path)
    described = " ".join(TOY.parser().format_help().split())
    assert (
        "--steps STEPS optimizer steps --threads THREADS torch threads per process --lr LR learning rate" in described
    )
    assert "--fast go fast" in described and TOY.start(["--fast"]).args.fast is True


def test_a_run_writes_both_files_with_its_command_and_settings(
    tmp_path: Path, capsys: pytest.CaptureFixture, torch_threads: None
) -> None:
    run = TOY.start(["--steps", "3", "--name", "out", "--results-dir", str(tmp_path)])
    json_path, md_path = run.finish({"results": {"a": 1}}, "Toy results", ["- one line", "", *_common.table(
        ["config", "value"], [["a", 1]])])  # fmt: skip
    assert (json_path, md_path) == (tmp_path / "out.json", tmp_path / "out.md")
    record = json.loads(json_path.read_text())
    assert list(record) == ["benchmark", "command", "environment", "settings", "results"]
    assert record["benchmark"] == "toy" and record["results"] == {"a": 1}
    assert record["command"].endswith(f"benchmarks/toy.py --steps 3 --name out --results-dir {tmp_path}")
    settings = {"name": "out", "smoke": False, "configs": "a,b", "steps": 3, "threads": 1, "lr": 0.1, "fast": False}
    assert record["settings"] == settings
    assert {"date", "torch", "pytorch_lightning", "python", "torch_threads", "machine"} <= set(record["environment"])
    markdown = md_path.read_text()
    assert markdown.startswith(f"# Toy results\n\n- command: `{record['command']}`\n- date: ")
    assert markdown.endswith("- one line\n\n| config | value |\n|---|---|\n| a | 1 |\n")
    assert f"wrote {json_path} and {md_path}" in capsys.readouterr().out


def test_a_run_refuses_unknown_configurations(capsys: pytest.CaptureFixture, torch_threads: None) -> None:
    assert TOY.start(["--configs", "b,a,"]).items("configs") == ["b", "a"]
    with pytest.raises(SystemExit):
        TOY.start(["--configs", "a,zzz"])
    assert "unknown configs ['zzz']; choose from ('a', 'b')" in capsys.readouterr().err
    assert "--configs CONFIGS comma-separated configurations, from a,b" in " ".join(TOY.parser().format_help().split())


def test_jobs_run_in_fresh_processes_and_keep_the_order_of_the_tasks() -> None:
    assert _common.in_processes(pow, [(2, 3), (3, 2), (2, 5)], jobs=1) == [8, 9, 32]
    assert _common.in_processes(pow, [(2, 3), (3, 2), (2, 5)], jobs=2) == [8, 9, 32]


def test_spread_and_its_text() -> None:
    s = _common.spread([3.0, 1.0, 2.0])
    assert s == {"median": 2.0, "min": 1.0, "max": 3.0, "n": 3}
    assert _common.fmt_spread(s, 3, "x") == "2.000x [1.000-3.000]"


# --- interleaved timing -------------------------------------------------------------------------------------------


def test_turns_rotate_round_by_round() -> None:
    assert [_timing.rotated(["a", "b", "c"], r) for r in range(4)] == [
        ["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"], ["a", "b", "c"]]  # fmt: skip


def test_a_timed_round_keeps_the_first_call_of_each_turn_apart() -> None:
    variants = {"small": nn.Linear(4, 4), "large": nn.Linear(4, 64)}
    inputs = (torch.randn(2, 4),)
    rounds = _timing.interleaved(variants, inputs, rounds=2, iters=3, block=2, label="test")
    assert len(rounds) == 2
    for rd in rounds:
        for name in variants:
            assert (len(rd[name]["wall_ms"]), len(rd[name]["cpu_ms"]), len(rd[name]["cold_wall_ms"])) == (3, 3, 3)
    single = _timing.time_round(variants, inputs, ["large", "small"], iters=2, block=1)
    assert (len(single["small"]["wall_ms"]), single["small"]["cold_wall_ms"]) == (2, [])
    summary = _timing.latency_summary(rounds, "small", block=2)
    assert set(summary) == {"median_of_medians_ms", "mean_ms", "cpu_median_of_medians_ms", "cold_median_of_medians_ms"}
    assert "cold_median_of_medians_ms" not in _timing.latency_summary(rounds, "small", block=1)


def test_ratios_are_taken_within_each_round() -> None:
    rounds = [{"a": {"wall_ms": [2.0, 4.0]}, "b": {"wall_ms": [1.0, 1.0]}},
              {"a": {"wall_ms": [9.0, 9.0]}, "b": {"wall_ms": [3.0, 3.0]}}]  # fmt: skip
    assert _timing.per_round(rounds, "a", statistics.fmean) == [3.0, 9.0]
    assert _timing.ratio(rounds, "a", "b", statistics.fmean) == {"median": 3.0, "min": 3.0, "max": 3.0, "n": 2}


def test_time_inside_times_the_hooked_layers_of_each_variant_and_removes_its_hooks() -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    layers = {"first": model[0], "last": model[2]}
    record = _timing.time_inside({"model": model}, {"model": layers}, (torch.randn(3, 8),), iters=4)
    assert set(record["model"]) == {"forward", "inside", "first", "last"}
    assert all(len(v) == 4 for v in record["model"].values())
    assert all(i <= f for i, f in zip(record["model"]["inside"], record["model"]["forward"], strict=True))
    assert not model[0]._forward_hooks and not model[0]._forward_pre_hooks


def test_interleaved_steps_time_every_name_once_per_turn() -> None:
    calls: list[str] = []
    times = _timing.interleaved_steps(calls.append, ["b", "a"], steps=2, warmup=1)
    assert calls == ["b", "a"] * 3 and {k: len(v) for k, v in times.items()} == {"b": 2, "a": 2}


def test_outputs_compare_by_difference_and_argmax() -> None:
    ref = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert _models.agreement(ref, ref) == {"max_abs_diff": 0.0, "ref_max_abs": 1.0, "rel_l2": 0.0,
                                           "argmax_agreement": 1.0}  # fmt: skip
    assert _models.agreement(ref, ref.flip(0))["argmax_agreement"] == 0.0


# --- the two cheapest scripts, in this process --------------------------------------------------------------------


def test_int8_speed_on_the_mlp(tmp_path: Path, torch_threads: None) -> None:
    int8_speed = importlib.import_module("int8_speed")
    int8_speed.main(
        ["--smoke", "--models", "mlp", "--train-models", "mlp", "--no-torchao", "--results-dir", f"{tmp_path}"]
    )
    record = json.loads((tmp_path / "int8_speed.json").read_text())
    mlp = record["inference"]["mlp"]
    on_kernels = 4 if mlp["kernels"]["onednn_available"] else 0  # none where this CPU's kernels are not exact
    assert mlp["kernels"]["int8_layers"] == 4 and mlp["kernels"]["layers_on_integer_kernel"] == on_kernels
    assert mlp["agreement"]["int8_vs_qat_eval"]["rel_l2"] < 1e-2
    assert record["training"]["mlp"]["output_rel_l2_vs_fp32"]["ours_observe"] == 0.0
    assert missing_fields("int8_speed", record, {"cnn", "minilm", "torchao"}) == []
    markdown = (tmp_path / "int8_speed.md").read_text()
    assert "| 4 x Linear(1024) + ReLU, batch 64 | 1 | ours: convert_to_int8 |" in markdown


def test_lowrank_speed_on_the_mlp(tmp_path: Path, torch_threads: None) -> None:
    lowrank_speed = importlib.import_module("lowrank_speed")
    lowrank_speed.main(["--smoke", "--models", "mlp", "--results-dir", str(tmp_path)])
    record = json.loads((tmp_path / "lowrank_speed.json").read_text())
    mlp = record["results"]["mlp"]
    assert set(mlp["target_ranks"].values()) == {128} and mlp["flops"]["model_flop_ratio"] == pytest.approx(4.0)
    assert mlp["checks"]["truncated_vs_masked"]["max_abs_diff"] < 1e-4
    assert missing_fields("lowrank_speed", record, {"cnn", "minilm"}) == []


# --- every script as its command line runs it ---------------------------------------------------------------------

#: Per script: what the smoke test adds to ``--smoke``, and the committed configurations it does not run.
SMOKE_RUNS: dict[str, tuple[list[str], set[str]]] = {
    "callback_hook_time": ([], set()),
    "composed_cnn": ([], set()),
    "int8_speed": (([] if HAS_TORCHAO else ["--no-torchao"]), set() if HAS_TORCHAO else {"torchao"}),
    "lowrank_accuracy": ([], {"lowrank_budget48", "lowrank_budget48_ramp"}),
    "lowrank_speed": ([], set()),
    "lowrank_truncation": ([], set()),
    "pruning_accuracy": (["--jobs", "2"], {"gradual99", "modelpruning99"}),
    "pruning_step_time": ([], set()),
    "qat_accuracy": ([], {"minilm_qat_late", "minilm_torchao"}),
    "stabilizer_overhead": ([], set()),
    "stabilizer_shock": ([], set()),
    "zero3_memory": ([], {"prune_layer", "prune_2to4", "lowrank_ramp", "qat", "gpt2"}),
}


def run_script(name: str, extra: list[str], folder: Path) -> dict[str, Any]:
    command = [sys.executable, str(BENCHMARKS / f"{name}.py"), "--smoke", *extra, "--results-dir", str(folder)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"{' '.join(command)} exited {done.returncode}:\n{done.stderr[-3000:]}"
    assert (folder / f"{name}.md").read_text().startswith("# ")
    return json.loads((folder / f"{name}.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SMOKE_RUNS))
def test_every_script_completes_its_smoke_run_with_results_shaped_like_the_committed_ones(
    name: str, tmp_path: Path
) -> None:
    extra, not_run = SMOKE_RUNS[name]
    record = run_script(name, extra, tmp_path)
    assert record["benchmark"] == name and record["settings"]["smoke"] is True
    assert missing_fields(name, record, not_run) == []


@pytest.mark.slow
def test_the_gpu_script_runs_end_to_end_as_a_dry_run_and_says_what_it_skipped(tmp_path: Path) -> None:
    """Without CUDA (and with --smoke) the GPU script runs every step at tiny sizes on the CPU: ZeRO-3 fits with the
    callbacks, the 2:4 masks, the low-rank inference model; the CUDA-only steps are skipped, each named. (Its CUDA
    figures are committed from a GPU machine; none has run it yet, so there is no committed file to compare with.)"""
    record = run_script("gpu", [], tmp_path)
    assert record["dry_run"] is True and record["device"] == "CPU (dry run)"
    assert any("semi-structured" in line for line in record["skipped"]) and any("bf16" in s for s in record["skipped"])
    fits = record["zero"]
    assert set(fits) == {"zero3/none", "zero3/prune_2to4", "zero3/lowrank_one_shot"}
    assert all(math.isfinite(fit["final_loss"]) and fit["cuda_peak_gb"] is None for fit in fits.values())
    assert fits["zero3/prune_2to4"]["sparsity"] == pytest.approx(0.5)
    assert fits["zero3/lowrank_one_shot"]["params_trained"] < fits["zero3/none"]["params_trained"]
    assert all(shape["mask_is_2to4"] and "speedup" not in shape for shape in record["sparse24"].values())
    assert record["inference"]["lowrank_0.25"]["params"] < record["inference"]["dense"]["params"]
    assert "DRY RUN" in (tmp_path / "gpu.md").read_text()


@pytest.mark.slow
def test_qat_accuracy_against_torchao(tmp_path: Path) -> None:
    pytest.importorskip("torchao")
    record = run_script("qat_accuracy", ["--configs", "minilm_torchao,minilm_steptime"], tmp_path)
    assert set(record["results"]) == {"minilm_torchao", "minilm_steptime"}
    assert set(record["results"]["minilm_steptime"]) >= {"fp32", "ours", "torchao"}
