"""The inputs the monitor counts FLOPs and times latency with: ``example_input_array``, or the first training call.

A :class:`ForwardCall` is one call of the model, or of one of its submodules, with its arguments. Lightning's
``example_input_array`` becomes one by :meth:`ForwardCall.of`. :class:`FirstForward` records the first call that a
training batch makes, for the many LightningModules that set no ``example_input_array``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle


@dataclass(frozen=True)
class ForwardCall:
    """``module`` (a qualified name inside the measured model; ``""`` is the model itself) called with ``args`` and
    ``kwargs``. The tensors go to the device of that module when the call is made."""

    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    module: str = ""

    @classmethod
    def of(cls, example: Any) -> ForwardCall:
        """Lightning's ``example_input_array`` convention: a tuple is the positional arguments, a dict the keyword
        arguments, anything else the one argument. A ForwardCall stays as it is."""
        if isinstance(example, ForwardCall):
            return example
        if isinstance(example, tuple):
            return cls(args=example)
        if isinstance(example, dict):
            return cls(kwargs=example)
        return cls(args=(example,))

    def target(self, model: nn.Module) -> nn.Module:
        """The module this call is made to, inside ``model``."""
        return model.get_submodule(self.module) if self.module else model

    def run(self, model: nn.Module) -> Any:
        """Make the call on ``model`` (or on its submodule ``self.module``)."""
        target = self.target(model)
        device = device_of(target)
        args, kwargs = map_tensors((self.args, self.kwargs), lambda tensor: tensor.to(device))
        return target(*args, **kwargs)

    def signature(self) -> str:
        """What the FLOPs of this call depend on: the module, the keyword names, each tensor's dtype and shape."""
        shapes: list[str] = []
        map_tensors((self.args, self.kwargs), lambda tensor: shapes.append(f"{tensor.dtype}{list(tensor.shape)}"))
        return f"{self.module or '<model>'}({', '.join(shapes)}; keywords: {', '.join(sorted(self.kwargs))})"


class FirstForward:
    """Records the first forward call made with tensors while started, detached and copied to the CPU.

    The call recorded is that of ``root`` itself when it is called (a LightningModule whose ``training_step`` calls
    ``self(x)``); otherwise that of the first of its immediate children holding parameters to be called with tensors
    (one that calls an inner model, ``self.model(**batch)``, the transformers idiom). The root's call wins over a
    child's, since a child is called from inside it. Loss modules and metrics hold no parameters, so they are never
    taken for the model. Hooks are forward pre-hooks on ``root`` and its children, removed by :meth:`stop` (and the
    root's, with every child's, as soon as the root's call is recorded). Under DDP or DeepSpeed pass the
    LightningModule, not the wrapper that the strategy calls; the strategy's own call of the LightningModule, which
    runs ``training_step`` through ``forward``, is not recorded.
    """

    def __init__(self, root: nn.Module) -> None:
        self.root = root
        self._root_handle: RemovableHandle | None = None
        self._child_handles: list[RemovableHandle] = []
        self._root_call: ForwardCall | None = None
        self._child_call: ForwardCall | None = None

    def start(self) -> None:
        """Attach the hooks (nothing happens when they are attached, or when a root call is already recorded)."""
        if self._root_handle is not None or self._root_call is not None:
            return
        self._root_handle = self.root.register_forward_pre_hook(self._recorder(""), with_kwargs=True)
        if self._child_call is None:
            self._child_handles = [
                child.register_forward_pre_hook(self._recorder(name), with_kwargs=True)
                for name, child in self.root.named_children()
                if next(child.parameters(), None) is not None
            ]

    def stop(self) -> ForwardCall | None:
        """Remove the hooks; the call recorded (the root's if any, else a child's), or None."""
        self._remove(root=True)
        return self._root_call or self._child_call

    def _recorder(self, name: str) -> Callable[[nn.Module, tuple[Any, ...], dict[str, Any]], None]:
        def record(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if not holds_tensors((args, kwargs)) or _redirected(module):
                return
            call = ForwardCall(*map_tensors((args, dict(kwargs)), detached_cpu_copy), module=name)
            if not name:
                self._root_call = call
                self._remove(root=True)
            elif self._child_call is None:
                self._child_call = call
                self._remove(root=False)

        return record

    def _remove(self, *, root: bool) -> None:
        for handle in self._child_handles:
            handle.remove()
        self._child_handles = []
        if root and self._root_handle is not None:
            self._root_handle.remove()
            self._root_handle = None


def _redirected(module: nn.Module) -> bool:
    """Whether this call runs another method through ``forward``: Lightning's DDP and DeepSpeed strategies call
    ``training_step`` so (its arguments are the batch and its index), with a plain function put in place of the
    bound ``forward`` for the one call."""
    return getattr(module.forward, "__func__", None) is not type(module).forward


def map_tensors(value: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    """``value`` with ``fn`` applied to every tensor inside tuples (named ones too), lists and mappings (a mapping
    type that cannot be rebuilt from a dict, as a dict; ``BatchEncoding`` can); everything else as it is."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return type(value)(*(map_tensors(item, fn) for item in value))
    if isinstance(value, (tuple, list)):
        return type(value)(map_tensors(item, fn) for item in value)
    if isinstance(value, Mapping):
        mapped = {key: map_tensors(item, fn) for key, item in value.items()}
        if type(value) is dict:
            return mapped
        try:
            return type(value)(mapped)
        except TypeError:  # e.g. defaultdict, whose first argument is a factory
            return mapped
    return value


def holds_tensors(value: Any) -> bool:
    found: list[bool] = []
    map_tensors(value, lambda tensor: found.append(True))
    return bool(found)


def detached_cpu_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A copy on the CPU, outside autograd (a copy also when it is on the CPU: the batch may be changed in place)."""
    return tensor.detach().to("cpu", copy=True)


def device_of(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    return torch.device("cpu")
