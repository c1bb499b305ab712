"""The one place that chooses the Lightning namespace, and the one place that reads Lightning's private attributes.

Lightning ships twice: as ``pytorch_lightning`` (the package this project depends on) and inside the unified
``lightning`` package as ``lightning.pytorch``. The classes are the same code under two names, and an ``isinstance``
check against one namespace is silently False for the other's objects. So:

- the namespace whose ``Callback``, ``LightningModule``, ``Trainer``, ``LightningCLI`` this project builds on is
  chosen once, here: the environment variable ``LIGHTNING_COMPRESS_NAMESPACE`` (``pytorch_lightning`` or
  ``lightning``) when set; otherwise ``lightning`` if a program has already imported ``lightning`` and not
  ``pytorch_lightning``; otherwise ``pytorch_lightning``;
- every ``isinstance`` check against a Lightning class (strategies, loggers) goes through :func:`is_instance`,
  which accepts that class from every Lightning namespace the process has loaded, so a Trainer from either one is
  recognised whichever was chosen;
- Lightning's private attributes are read only here, each with a fallback and the reason it is read.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Mapping
from typing import Any

#: The two names of Lightning's trainer package, as importable modules.
NAMESPACES: dict[str, str] = {"pytorch_lightning": "pytorch_lightning", "lightning": "lightning.pytorch"}
ENV_VARIABLE = "LIGHTNING_COMPRESS_NAMESPACE"


def _choose_namespace() -> str:
    wanted = os.environ.get(ENV_VARIABLE, "").strip()
    if wanted:
        if wanted not in NAMESPACES and wanted not in NAMESPACES.values():
            raise ImportError(
                f"`{ENV_VARIABLE}`={wanted!r} is not a Lightning namespace; valid: 'pytorch_lightning' or 'lightning'"
                " (the unified package's lightning.pytorch). HINT: unset it to use pytorch_lightning."
            )
        return NAMESPACES.get(wanted, wanted)
    if "lightning" in sys.modules and "pytorch_lightning" not in sys.modules:
        return NAMESPACES["lightning"]
    return NAMESPACES["pytorch_lightning"]


NAMESPACE: str = _choose_namespace()
pl: Any = importlib.import_module(NAMESPACE)
Callback = pl.Callback
LightningDataModule = pl.LightningDataModule
LightningModule = pl.LightningModule
Trainer = pl.Trainer
rank_zero_info = importlib.import_module(f"{NAMESPACE}.utilities").rank_zero_info
seed_everything = pl.seed_everything


def submodule(name: str) -> Any:
    """``NAMESPACE.name`` imported, e.g. ``submodule("cli").LightningCLI`` or ``submodule("loggers")``."""
    return importlib.import_module(f"{NAMESPACE}.{name}")


def is_instance(obj: object, subpackage: str, class_name: str) -> bool:
    """``isinstance(obj, <ns>.<subpackage>.<class_name>)`` for every Lightning namespace this process has imported.

    Only namespaces already in ``sys.modules`` are consulted (an object of a namespace nobody imported cannot exist),
    so this never imports ``lightning`` or ``pytorch_lightning`` on its own, nor optional packages behind them.
    """
    for root in NAMESPACES.values():
        if root not in sys.modules:
            continue
        try:
            cls = getattr(importlib.import_module(f"{root}.{subpackage}"), class_name)
        except (ImportError, AttributeError):
            continue
        if isinstance(obj, cls):
            return True
    return False


def uses_deepspeed(trainer: Any) -> bool:
    """Whether ``trainer`` runs Lightning's DeepSpeedStrategy (or a subclass), from either namespace."""
    return is_instance(getattr(trainer, "strategy", None), "strategies", "DeepSpeedStrategy")


def loggers_of(trainer: Any, class_name: str) -> list[Any]:
    """The trainer's loggers that are Lightning's ``class_name`` logger (e.g. ``"WandbLogger"``), either namespace."""
    return [logger for logger in getattr(trainer, "loggers", ()) if is_instance(logger, "loggers", class_name)]


# ------------------------------------------------------------------------------------------ private attributes


def logs_this_step(trainer: Any) -> bool:
    """Whether Lightning writes step metrics to the loggers after this batch.

    Private: ``trainer._logger_connector.should_update_logs`` is what Lightning's own LearningRateMonitor asks; no
    public property says it. Fallback when it is gone: the public ``log_every_n_steps`` grid.
    """
    connector = getattr(trainer, "_logger_connector", None)
    flag = getattr(connector, "should_update_logs", None)
    if isinstance(flag, bool):
        return flag
    every = getattr(trainer, "log_every_n_steps", 1) or 0
    return every > 0 and (getattr(trainer, "global_step", 0) + 1) % every == 0


def saved_hyperparameters(model: Any) -> Mapping[str, Any] | None:
    """The arguments ``save_hyperparameters()`` recorded for ``model``, or None when it was never called.

    Private: ``_hparams_initial`` is set by ``save_hyperparameters()`` only, so its absence tells "never called" from
    "called for a class without arguments"; the public ``hparams_initial`` is an empty dict in both cases. Fallback
    when Lightning renames it: the public property, with an empty one read as "never called".
    """
    if "_hparams_initial" in getattr(model, "__dict__", {}):
        value = model.__dict__["_hparams_initial"]
        return value if isinstance(value, Mapping) else None
    public = getattr(model, "hparams_initial", None)
    return public if isinstance(public, Mapping) and public else None


def forget_metric_names(module: Any) -> None:
    """Clear a LightningModule copy's cache of metric attribute names.

    Private: ``_metric_attributes`` maps ``id(metric) -> attribute name``; in a deep copy those ids are the
    original's, so ``self.log(name, metric)`` would fail on the copy. Lightning rebuilds the cache when it is None.
    Fallback when the attribute is gone: nothing to clear.
    """
    if "_metric_attributes" in getattr(module, "__dict__", {}):
        module.__dict__["_metric_attributes"] = None


def restore_signal_on_teardown(trainer: Any, signum: int, handler: Any) -> None:
    """Make Lightning's own teardown of the fit put ``handler`` back for ``signum``.

    Private: Lightning's signal connector records the handlers in place when it installs its own
    (``_original_handlers``) and re-installs them after the callbacks' ``teardown``; a callback that installed a
    handler before that would otherwise find it re-installed. Fallback when the attribute is gone: nothing.
    """
    originals = getattr(getattr(trainer, "_signal_connector", None), "_original_handlers", None)
    if isinstance(originals, dict) and signum in originals:
        originals[signum] = handler


def end_fit_now() -> None:
    """Leave ``Trainer.fit`` from inside a training hook: the callbacks' ``teardown`` runs, their ``on_train_end`` and
    ``on_fit_end`` do not, and ``fit`` returns normally.

    Private: this is the exception Lightning's own tuner callbacks raise (``_TunerExitException``), which
    ``fit`` catches as a clean finish. Fallback when it is gone: a RuntimeError that says so.
    """
    exit_exception = getattr(submodule("utilities.exceptions"), "_TunerExitException", None)
    if exit_exception is None:
        raise RuntimeError("this Lightning version has no clean exit from inside fit (`_TunerExitException`)")
    raise exit_exception()


def spawns_ranks(trainer: Any) -> bool:
    """Whether Lightning started this fit's ranks itself with multiprocessing (``ddp_spawn``, notebooks): an
    exception that leaves ``fit`` in such a rank does not reach the caller as a return. Private: the launcher's
    class name. Fallback: False."""
    launcher = getattr(getattr(trainer, "strategy", None), "launcher", None)
    return type(launcher).__name__ == "_MultiProcessingLauncher"


def injects_distributed_sampler(trainer: Any) -> bool:
    """Whether Lightning would replace a training loader's sampler by a ``DistributedSampler`` for ``trainer``.
    Private: ``Trainer(use_distributed_sampler=...)`` is kept on the accelerator connector only. Fallback: its
    default, True, in a run of more than one process."""
    connector = getattr(trainer, "_accelerator_connector", None)
    return trainer.world_size > 1 and bool(getattr(connector, "use_distributed_sampler", True))


__all__ = [
    "NAMESPACE",
    "NAMESPACES",
    "Callback",
    "LightningDataModule",
    "LightningModule",
    "Trainer",
    "end_fit_now",
    "forget_metric_names",
    "injects_distributed_sampler",
    "is_instance",
    "loggers_of",
    "logs_this_step",
    "pl",
    "rank_zero_info",
    "restore_signal_on_teardown",
    "saved_hyperparameters",
    "seed_everything",
    "spawns_ranks",
    "submodule",
    "uses_deepspeed",
]
