"""The `lightning-compress` command.

``demo`` trains on bundled data with no arguments. ``fit``, ``validate``, ``test`` and ``predict`` are Lightning's
own LightningCLI, so every usual flag works; recipe files given with ``--config`` are checked first by the same
safe loader as :func:`lightning_compress.load_recipe` (allow-listed callbacks, strict arguments).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Sequence

from lightning_compress._lightning import LightningDataModule, LightningModule, submodule
from lightning_compress.recipes import RecipeError, validate_recipe_file
from lightning_compress.teardown import destroy_process_groups

LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")
USAGE = """usage: lightning-compress {demo,fit,validate,test,predict} ...

  demo                          train the reference CNN on bundled data and print a results table
  fit --config RECIPE.yaml      run a recipe (LightningCLI: any --trainer.* / --model.* / --data.* flag works)
  validate | test | predict     LightningCLI's other subcommands

Run `lightning-compress SUBCOMMAND --help` for the options of one subcommand.
"""


def config_paths(argv: Sequence[str]) -> Iterator[str]:
    """The files named by ``--config FILE``, ``--config=FILE`` or ``-c FILE``."""
    for i, arg in enumerate(argv):
        if arg in ("--config", "-c") and i + 1 < len(argv):
            yield argv[i + 1]
        elif arg.startswith("--config="):
            yield arg.split("=", 1)[1]


def requeued_slurm_job() -> bool:
    """Whether this is a SLURM job running again after a requeue (``SLURM_RESTART_COUNT`` > 0).

    Under SLURM, Lightning's default logger names its folder after the job id, so a requeued job logs into the
    folder of its first run, where LightningCLI saved the run's ``config.yaml`` and, by default, refuses to write it
    again. The requeued job is the same job with the same command line: its config may replace its own.
    """
    count = os.environ.get("SLURM_RESTART_COUNT", "0")
    return count.isdigit() and int(count) > 0


def run_lightning_cli(argv: list[str] | None) -> None:
    """Lightning's CLI over ``argv`` (``None``: read ``sys.argv`` as a console script does)."""
    LightningCLI = submodule("cli").LightningCLI

    import lightning_compress.data  # noqa: F401  (registers the bundled DataModules for short class names)
    import lightning_compress.models  # noqa: F401  (registers the bundled models)

    LightningCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=argv,
        auto_configure_optimizers=False,
        save_config_kwargs={"overwrite": requeued_slurm_job()},
    )
    destroy_process_groups()  # the run finished: its gloo threads are joined now, not torn down at exit (teardown.py)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE, end="")
        return 0 if args else 2
    command = args[0]
    if command == "demo":
        from lightning_compress.demo import main as demo_main

        return demo_main(args[1:])
    if command not in LIGHTNING_SUBCOMMANDS:
        print(f"lightning-compress: unknown subcommand {command!r}; valid: demo, {', '.join(LIGHTNING_SUBCOMMANDS)}\n")
        print(USAGE, end="", file=sys.stderr)
        return 2
    try:
        for path in config_paths(args[1:]):
            validate_recipe_file(path)
    except RecipeError as err:
        print(f"lightning-compress: {err}", file=sys.stderr)
        return 2
    run_lightning_cli(None if argv is None else args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
