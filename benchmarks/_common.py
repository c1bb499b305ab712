"""The skeleton every benchmark runs on: its command line, its runs in one process or several, its result files.

A benchmark script declares itself: its options (the shared ones below with its defaults, and its own), its tiny
setting and the lists some options choose from; its ``main`` starts a run, measures, and writes the results::

    BENCHMARK = Benchmark(
        "pruning_accuracy", __doc__,
        shared={"configs": "dense,gradual90", "epochs": 4, "seed": 0, "jobs": 1, "threads": 1},
        options={"limit_test_batches": (1.0, "Trainer.limit_test_batches")},
        smoke={"epochs": 2, "limit_test_batches": 2.0},
        choices={"configs": CONFIGS},
    )

    def main(argv=None):
        run = BENCHMARK.start(argv)   # parsed, --smoke applied, choices checked, process quieted
        ...                           # measure
        run.finish({"results": ...}, "Title", markdown_lines)

Every script takes ``--name`` (the results file stem), ``--results-dir`` and ``--smoke``. ``--smoke`` sets the
script's tiny values (options given on the command line still win) and, unless ``--results-dir`` says otherwise,
writes into a new temporary folder: a smoke run checks that the benchmark works and never overwrites the committed
``benchmarks/results/``. The two files are ``<name>.json`` (every raw number, the command that produced them, the
environment and the settings) and ``<name>.md`` (the tables, headed by the command, date and versions).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import logging
import multiprocessing as mp
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import torch

from lightning_compress._lightning import pl

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
MACHINE_NOTE = "2-core shared CPU (other jobs were running tests at the same time), no GPU"

#: Trainer settings that keep a benchmark quiet and free of work it does not measure.
QUIET = dict(
    accelerator="cpu",
    devices=1,
    logger=False,
    enable_checkpointing=False,
    enable_progress_bar=False,
    enable_model_summary=False,
    num_sanity_val_steps=0,
    limit_val_batches=0,
    deterministic=False,
)


def quiet_process(threads: int) -> None:
    """Run this process on ``threads`` torch threads, offline, without Lightning's per-run chatter."""
    logging.getLogger(pl.__name__).setLevel(logging.WARNING)  # no "GPU available" lines per run
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(threads)
    except RuntimeError:  # already set in this process
        pass


def in_processes(work: Callable[..., Any], tasks: Sequence[tuple[Any, ...]], jobs: int) -> list[Any]:
    """``[work(*task) for task in tasks]``, ``jobs`` fresh spawned processes at a time when ``jobs`` > 1.

    Each task gets a process of its own (nothing carries over from one task to the next); every task seeds itself,
    so ``jobs`` changes wall time only.
    """
    if jobs <= 1 or len(tasks) <= 1:
        return [work(*task) for task in tasks]
    with mp.get_context("spawn").Pool(min(jobs, len(tasks)), maxtasksperchild=1) as pool:
        return pool.starmap(work, tasks, chunksize=1)


def environment(threads: int, **extra: Any) -> dict[str, Any]:
    """Date, versions, torch threads and the machine, for the results files."""
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "pytorch_lightning": pl.__version__,
        "python": platform.python_version(),
        "torch_threads": threads,
        "cpu_count": os.cpu_count(),
        "machine": MACHINE_NOTE,
        **extra,
    }


def package_version(package: str) -> str | None:
    """The installed version of ``package``, or None when it is not installed."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def spread(values: Sequence[float]) -> dict[str, float]:
    """Median, min, max and count of ``values``."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def fmt_spread(s: dict[str, float], digits: int = 2, suffix: str = "") -> str:
    """A ``spread`` as ``median [min-max]``, e.g. ``3.11x [2.85-3.37]``."""
    return f"{s['median']:.{digits}f}{suffix} [{s['min']:.{digits}f}-{s['max']:.{digits}f}]"


def table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    """A markdown table: the header, its rule and one line per row of cells."""
    return [table_row(header), "|" + "---|" * len(header), *(table_row(cells) for cells in rows)]


def table_row(cells: Sequence[Any]) -> str:
    return "| " + " | ".join(str(cell) for cell in cells) + " |"


def command_line(script: str, argv: Sequence[str]) -> str:
    """How the benchmark was started, paths relative to the project root (for the results files)."""
    python = Path(sys.executable)
    shown = python.relative_to(ROOT).as_posix() if python.is_relative_to(ROOT) else "python"
    return shlex.join([shown, script, *argv])


#: Options of what a run runs, and where.
_RUN_OPTIONS: dict[str, tuple[type, str]] = {
    "configs": (str, "comma-separated configurations"),
    "seed": (int, "the seed of every configuration (initial weights, data order, dropout masks)"),
    "jobs": (int, "configurations at once, one process each (each seeds itself: --jobs changes wall time only)"),
    "threads": (int, "torch threads per process"),
}
#: Options several benchmarks take, each with one meaning (type and help); a script names the ones it takes and gives
#: their defaults: ``Benchmark(..., shared={"rounds": 8, "seed": 0})``.
SHARED_OPTIONS: dict[str, tuple[type, str]] = {
    **_RUN_OPTIONS,
    "models": (str, "comma-separated models"),
    "epochs": (int, "training epochs"),
    "steps": (int, "optimizer steps"),
    "limit_train": (int, "cut the training set to its first N examples (smoke)"),
    "limit_test": (int, "test on the first N test examples (smoke)"),
    "rounds": (int, "interleaved rounds (every variant takes its turns in each; the order rotates per round)"),
    "iters": (int, "timed turns per variant per round (0: the model's default)"),
    "share_iters": (int, "forwards timed with hooks inside the layers (median)"),
}


@dataclass(frozen=True)
class Benchmark:
    """One benchmark script: its name (file stem and default results stem), its docstring and its options.

    ``shared`` names options of ``SHARED_OPTIONS`` with the script's defaults; ``options`` are the script's own, each
    ``name: (default, help)`` (the type is the default's; a False default makes a flag). ``smoke`` maps option names
    (``"limit_train"`` for ``--limit-train``) to the values ``--smoke`` sets. ``choices`` maps comma-separated options
    such as ``"configs"`` to their valid items; :meth:`start` refuses any other.
    """

    name: str
    doc: str
    smoke: dict[str, Any]
    shared: dict[str, Any] = field(default_factory=dict)
    options: dict[str, tuple[Any, str]] = field(default_factory=dict)
    choices: dict[str, Sequence[str]] = field(default_factory=dict)

    @property
    def script(self) -> str:
        return f"benchmarks/{self.name}.py"

    def parser(self) -> argparse.ArgumentParser:
        """The script's command line: ``--name``, ``--results-dir``, ``--smoke``, then its shared and own options."""
        parser = argparse.ArgumentParser(prog=self.script, description=self.doc.strip().split("\n")[0])
        parser.add_argument("--name", default=self.name, help="results file stem (default: %(default)s)")
        parser.add_argument(
            "--results-dir",
            type=Path,
            default=None,
            help="folder of the results files (default: benchmarks/results; with --smoke a new temporary folder)",
        )
        tiny = ", ".join(f"{_flag(key)} {value}" for key, value in self.smoke.items())
        parser.add_argument("--smoke", action="store_true", help=f"a tiny run that checks the benchmark works: {tiny}")
        for option, default in self.shared.items():
            kind, words = SHARED_OPTIONS[option]
            parser.add_argument(_flag(option), type=kind, default=default, help=words + self._from(option))
        for option, (default, words) in self.options.items():
            if default is False:
                parser.add_argument(_flag(option), action="store_true", help=words)
            else:
                parser.add_argument(_flag(option), type=type(default), default=default, help=words + self._from(option))
        return parser

    def _from(self, option: str) -> str:
        return f", from {','.join(self.choices[option])}" if option in self.choices else ""

    def start(self, argv: Sequence[str] | None = None) -> Run:
        """Parse ``argv`` (default: the command line), apply ``--smoke``, choose the results folder, check the
        ``choices``, and quiet this process at ``--threads`` torch threads (when the script takes that option)."""
        argv = list(sys.argv[1:] if argv is None else argv)
        parser = self.parser()
        args = parser.parse_args(argv)
        if args.smoke:
            parser.set_defaults(**self.smoke)
            args = parser.parse_args(argv)
        if args.results_dir is None:
            args.results_dir = Path(tempfile.mkdtemp(prefix=f"{self.name}_smoke_")) if args.smoke else RESULTS
        run = Run(self, parser, args, command_line(self.script, argv))
        for option in self.choices:
            run.items(option)
        if isinstance(getattr(args, "threads", None), int):
            quiet_process(args.threads)
        return run


def _flag(option: str) -> str:
    return "--" + option.replace("_", "-")


@dataclass
class Run:
    """One run of a benchmark: its parsed arguments, the command that started it, its clock and its results files."""

    benchmark: Benchmark
    parser: argparse.ArgumentParser
    args: argparse.Namespace
    command: str
    started: float = field(default_factory=time.perf_counter)

    @property
    def settings(self) -> dict[str, Any]:
        """The arguments, as recorded in the JSON file (not the results folder: a path of this machine)."""
        return {key: value for key, value in vars(self.args).items() if key != "results_dir"}

    def wall_s(self) -> float:
        return time.perf_counter() - self.started

    def error(self, message: str) -> NoReturn:
        self.parser.error(message)

    def items(self, option: str) -> list[str]:
        """The comma-separated ``option`` as a list, every item one of the benchmark's choices (else a usage error)."""
        chosen = [item for item in getattr(self.args, option).split(",") if item]
        valid = self.benchmark.choices[option]
        if unknown := sorted(set(chosen) - set(valid)):
            self.error(f"unknown {option} {unknown}; choose from {tuple(valid)}")
        return chosen

    def finish(
        self, payload: dict[str, Any], title: str, lines: Sequence[str], threads: int | None = None, **env: Any
    ) -> tuple[Path, Path]:
        """Write ``<name>.json`` (benchmark, command, environment, settings, then ``payload``) and ``<name>.md``
        (``title``, the command, date and versions, then ``lines``); print the markdown and where both went."""
        threads = getattr(self.args, "threads", 1) if threads is None else threads
        environ = environment(threads, **env)
        record = {
            "benchmark": self.benchmark.name,
            "command": self.command,
            "environment": environ,
            "settings": self.settings,
            **payload,
        }
        header = [
            f"# {title}",
            "",
            f"- command: `{self.command}`",
            f"- date: {environ['date']}",
            f"- torch {environ['torch']}, pytorch-lightning {environ['pytorch_lightning']}, Python {environ['python']}",
            f"- torch threads: {environ['torch_threads']} (`torch.set_num_threads`); machine: {environ['machine']}",
        ]
        markdown = "\n".join([*header, *lines]) + "\n"
        folder = Path(self.args.results_dir)
        folder.mkdir(parents=True, exist_ok=True)
        json_path, md_path = folder / f"{self.args.name}.json", folder / f"{self.args.name}.md"
        json_path.write_text(json.dumps(record, indent=2) + "\n")
        md_path.write_text(markdown)
        print(markdown)
        print(f"wrote {json_path} and {md_path}", flush=True)
        return json_path, md_path
