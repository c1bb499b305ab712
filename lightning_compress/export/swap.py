"""Layers put in place by name, in a view that leaves the model as it is, or in the model itself.

Writing: :func:`export_view` is the model as the file stores it, each layer that has an export form (a QAT layer
that fake-quantizes: its int8 layer) in place of the layer; the user's model is not changed, and the view shares
every other module and tensor with it. Reading: ``load_compressed`` checks the file against :func:`swapped` (the
skeleton with the recorded layers in place), and only once everything fits puts them into the skeleton with
:func:`place`.
"""

from __future__ import annotations

import copy
from typing import Protocol, runtime_checkable

from torch import nn

from lightning_compress.distributed import gathered


@runtime_checkable
class ExportsAs(Protocol):
    """A layer that is stored as another layer: ``save_compressed`` writes ``export_form()`` in its place (itself,
    when there is nothing to convert). The QAT layers answer with their int8 layer once they fake-quantize."""

    def export_form(self) -> nn.Module: ...


def export_view(model: nn.Module) -> nn.Module:
    """``model`` with every outermost :class:`ExportsAs` layer replaced by its export form (``model`` itself when
    no layer has one). Collective under ZeRO-3: each layer's parameters are gathered while its form is made."""
    forms: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if not name or any(name.startswith(f"{outer}.") for outer in forms) or not isinstance(module, ExportsAs):
            continue
        with gathered(list(module.parameters())):
            form = module.export_form()
        if form is not module:
            forms[name] = form
    return swapped(model, forms) if forms else model


def swapped(model: nn.Module, replacements: dict[str, nn.Module]) -> nn.Module:
    """A view of ``model`` with ``replacements`` (``{qualified name: module}``) in place: the modules on the path to
    each name are shallow copies with their own child tables, everything else (tensors included) is shared, and
    ``model`` is left as it is. Every name must be a submodule of ``model``."""
    copies: dict[str, nn.Module] = {"": _shallow(model)}

    def copied(name: str) -> nn.Module:
        if name not in copies:
            parent_name, _, child = name.rpartition(".")
            parent = copied(parent_name)
            copies[name] = parent._modules[child] = _shallow(parent._modules[child])
        return copies[name]

    for name in sorted(replacements, key=lambda n: (n.count("."), n)):
        parent_name, _, child = name.rpartition(".")
        copies[name] = copied(parent_name)._modules[child] = replacements[name]
    return copies[""]


def place(model: nn.Module, replacements: dict[str, nn.Module]) -> None:
    """Put each of ``replacements`` into ``model`` itself at its qualified name, parents before children."""
    for name in sorted(replacements, key=lambda n: (n.count("."), n)):
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, replacements[name])


def _shallow(module: nn.Module) -> nn.Module:
    clone = copy.copy(module)
    clone._modules = dict(module._modules)
    return clone
