"""The ``weight`` a factorised layer shows to model code: its dense weight, formed only where it is computed with.

Model code reads a layer's ``weight`` mostly for its metadata: transformers casts inputs with
``x.to(layer.weight.dtype)`` (T5's feed-forward reads ``self.wo.weight`` four times per call, ViT its patch
embedding's once per forward), and checks ``isinstance(layer.weight, torch.Tensor)``. Forming ``second @ first`` for
that costs ``out x in x rank`` multiply-adds per read: at batch 1 (generation) many times the layer's own forward.

:class:`DenseWeightView` is a tensor with the dense weight's shape, dtype, device and ``requires_grad`` and no
storage; each layer keeps one while its metadata stays (the same object on every read, and never keeping the layer
alive). Reading its metadata is an attribute read; any other use (an op, ``.data``, ``repr``) forms the product,
differentiably, through the layer's ``dense_weight()``, and runs on it. It is read-only: an in-place op on it raises,
instead of writing into a temporary the layer never sees. Under ``torch.compile`` the layer returns the plain product
instead (the compiler drops it when only metadata is read).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch.utils import _pytree

__all__ = ["DenseWeightView", "dense_view"]

_METADATA_PROPERTIES = ("dtype", "shape", "device", "ndim", "requires_grad", "is_cuda", "is_cpu", "is_meta", "layout",
                        "is_sparse", "is_quantized", "itemsize", "nbytes")  # fmt: skip
_METADATA_METHODS = ("size", "dim", "ndimension", "numel", "nelement", "element_size", "is_floating_point",
                     "is_complex", "__len__", "get_device")  # fmt: skip
#: Tensor members answered from the view's own metadata, without forming the product.
METADATA: frozenset[Callable[..., Any]] = frozenset(
    [getattr(torch.Tensor, name).__get__ for name in _METADATA_PROPERTIES]
    + [getattr(torch.Tensor, name) for name in _METADATA_METHODS]
)
#: Writes that end in ``_`` by convention, and these.
_WRITES = frozenset([torch.Tensor.__setitem__, torch.Tensor.data.__set__, torch.Tensor.requires_grad.__set__])


#: Each layer's view, with the (dtype, device, requires_grad) it was made for. Weak: a view never keeps its layer.
_VIEWS: weakref.WeakKeyDictionary[Any, tuple[tuple[Any, ...], DenseWeightView]] = weakref.WeakKeyDictionary()


def dense_view(
    layer: Any, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, requires_grad: bool
) -> DenseWeightView:
    """The view of ``layer``'s dense weight (``layer.dense_weight()``) with this metadata: the one made before if it
    had the same, else a new one."""
    key = (tuple(shape), dtype, device, requires_grad)
    held = _VIEWS.get(layer)
    if held is not None and held[0] == key:
        return held[1]
    view = DenseWeightView(layer, *key)
    _VIEWS[layer] = (key, view)
    return view


class DenseWeightView(torch.Tensor):
    """The dense weight of ``layer`` (an object with ``dense_weight() -> Tensor``), formed on use. See the module."""

    _layer: weakref.ref[Any]

    @staticmethod
    def __new__(
        cls, layer: Any, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, requires_grad: bool
    ) -> DenseWeightView:
        view = torch.Tensor._make_wrapper_subclass(cls, shape, dtype=dtype, device=device, requires_grad=requires_grad)
        view._layer = weakref.ref(layer)
        return view

    @classmethod
    def __torch_function__(
        cls, func: Callable[..., Any], types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        if func in METADATA:
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        target = args[0] if args else next(iter(kwargs.values()), None)  # what a write writes into
        if isinstance(target, DenseWeightView) and _is_write(func):
            layer = type(target._layer()).__name__
            raise RuntimeError(
                f"`{layer}.weight` is read-only: it is the product of the factors `first` and `second`, formed when"
                f" used, so `{getattr(func, '__name__', func)}` on it would change a temporary and not the layer."
                f" HINT: edit `first`/`second` (or `{layer}.to_dense()`, edit that, and factorise it again)."
            )
        args, kwargs = _pytree.tree_map_only(DenseWeightView, _materialise, (args, kwargs))
        return func(*args, **kwargs)

    @classmethod
    def __torch_dispatch__(
        cls, func: Callable[..., Any], types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        raise RuntimeError(
            f"{func} reached a factorised layer's `weight` view with torch functions disabled, so its values were"
            " never formed. HINT: use `layer.dense_weight()`, the same tensor, formed."
        )


def _materialise(view: DenseWeightView) -> torch.Tensor:
    layer = view._layer()
    if layer is None:
        raise RuntimeError(
            "This `weight` belonged to a factorised layer that no longer exists. HINT: keep `layer.dense_weight()`"
            " (a tensor) instead of `layer.weight` (a view of the layer) where the layer may be deleted."
        )
    return layer.dense_weight()


def _is_write(func: Callable[..., Any]) -> bool:
    name = getattr(func, "__name__", "")
    return func in _WRITES or (name.endswith("_") and not name.endswith("__"))
