"""Tensor codecs: one tensor <-> named parts (tensors) + JSON-able metadata.

``save_compressed`` stores each state-dict tensor with the codec :func:`choose_codec` picks, and the monitor reports
:func:`packed_nbytes` as ``compress/bytes_compressed``: both go through this file, so the number logged during
training is the number of tensor bytes in the exported file (the file adds only its header).

A codec is one class registered with :func:`register_codec`. Lossless codecs (``lossless = True``) take part in the
automatic choice; a lossy one (int8, low-rank factors) is used only when asked for by name.

- ``dense``: the tensor as it is (part ``data``), bit for bit.
- ``bitmask``: a packed bit mask of the non-zero elements, 1 bit per element, most significant bit first (part
  ``bitmask``, ``uint8``), and those elements in order (part ``values``, 1-D, the tensor's dtype), copied as raw
  bits. Every non-zero element (NaN payloads, infinities, subnormals) reads back bit for bit; a zero reads back as
  ``+0.0``: ``-0.0`` (IEEE-equal to ``0.0``) counts as zero, because pruning by ``weight.mul_(mask)`` turns every
  pruned negative weight into ``-0.0`` and remembering those signs would cost one more bit per pruned weight.

"Lossless" means that much: ``unpack(*pack(t))`` equals ``t`` element for element, bit-exact up to the sign of zero.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch

__all__ = [
    "CODECS",
    "BitmaskCodec",
    "Codec",
    "DenseCodec",
    "PackingError",
    "choose_codec",
    "get_codec",
    "pack",
    "packed_nbytes",
    "register_codec",
    "unpack",
]


class PackingError(ValueError):
    """Parts or metadata that do not describe a tensor of the codec they claim."""


CODECS: dict[str, Codec] = {}
"""Codec instances by name, in registration order (``dense`` first: it wins ties)."""


def register_codec(cls: type[Codec]) -> type[Codec]:
    """Class decorator: make ``cls`` available under ``cls.name``."""
    if not cls.name or cls.name in CODECS:
        raise ValueError(f"codec name {cls.name!r} is empty or already registered ({sorted(CODECS)}).")
    CODECS[cls.name] = cls()
    return cls


def get_codec(name: str) -> Codec:
    try:
        return CODECS[name]
    except (KeyError, TypeError):
        raise PackingError(f"unknown codec {name!r}; known codecs: {sorted(CODECS)}.") from None


class Codec:
    """Turns one tensor into named parts and metadata (``shape``, ``dtype`` and the codec's own keys), and back."""

    name: ClassVar[str] = ""
    lossless: ClassVar[bool] = True
    parts: ClassVar[tuple[str, ...]] = ()

    def supports(self, tensor: torch.Tensor) -> bool:
        return True

    def nbytes(self, tensor: torch.Tensor) -> int:
        """The bytes of the parts ``pack(tensor)`` returns, computed without building them."""
        raise NotImplementedError

    def pack(self, tensor: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        raise NotImplementedError

    def unpack(self, parts: dict[str, torch.Tensor], meta: dict[str, Any]) -> torch.Tensor:
        raise NotImplementedError

    def part_names(self, meta: dict[str, Any]) -> tuple[str, ...]:
        """The parts a file must hold for a tensor with this metadata."""
        return self.parts


def _base_meta(tensor: torch.Tensor) -> dict[str, Any]:
    return {"shape": list(tensor.shape), "dtype": dtype_name(tensor.dtype)}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def parse_dtype(name: Any) -> torch.dtype:
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(dtype, torch.dtype):
        raise PackingError(f"unknown dtype {name!r} in the metadata.")
    return dtype


def meta_shape_dtype(meta: Any) -> tuple[torch.Size, torch.dtype]:
    """The ``shape`` and ``dtype`` every codec records, validated."""
    if not isinstance(meta, dict):
        raise PackingError(f"metadata must be a JSON object, got {meta!r}.")
    shape = meta.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise PackingError(f"metadata `shape` must be a list of non-negative integers, got {shape!r}.")
    return torch.Size(shape), parse_dtype(meta.get("dtype"))


def _check_part(parts: dict[str, torch.Tensor], name: str, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    part = parts.get(name)
    if not isinstance(part, torch.Tensor):
        raise PackingError(f"part `{name}` is missing.")
    if part.shape != shape or part.dtype != dtype:
        raise PackingError(
            f"part `{name}` is {dtype_name(part.dtype)}{list(part.shape)}, expected {dtype_name(dtype)}{list(shape)}."
        )
    return part


@register_codec
class DenseCodec(Codec):
    """The tensor as it is."""

    name = "dense"
    parts = ("data",)

    def nbytes(self, tensor: torch.Tensor) -> int:
        return tensor.numel() * tensor.element_size()

    def pack(self, tensor: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return {"data": tensor.detach().contiguous()}, _base_meta(tensor)

    def unpack(self, parts: dict[str, torch.Tensor], meta: dict[str, Any]) -> torch.Tensor:
        shape, dtype = meta_shape_dtype(meta)
        return _check_part(parts, "data", shape, dtype)


_BIT_WEIGHTS = (128, 64, 32, 16, 8, 4, 2, 1)
_SAME_SIZE_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _as_bits(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor viewed as integers of the same width, to copy its elements bit for bit."""
    return tensor.view(_SAME_SIZE_INT[tensor.element_size()])


@register_codec
class BitmaskCodec(Codec):
    """A packed bit mask of the non-zero elements plus their values: ``ceil(numel/8) + nnz * itemsize`` bytes."""

    name = "bitmask"
    parts = ("bitmask", "values")

    def supports(self, tensor: torch.Tensor) -> bool:
        return not tensor.is_complex() and tensor.element_size() in _SAME_SIZE_INT

    def nbytes(self, tensor: torch.Tensor) -> int:
        nnz = int((tensor.detach() != 0).sum())  # -0.0 counts as zero, NaN as non-zero
        return math.ceil(tensor.numel() / 8) + nnz * tensor.element_size()

    def pack(self, tensor: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        flat = tensor.detach().reshape(-1)
        mask = flat != 0
        padded = torch.zeros(math.ceil(flat.numel() / 8) * 8, dtype=torch.uint8, device=flat.device)
        padded[: flat.numel()] = mask
        weights = torch.tensor(_BIT_WEIGHTS, dtype=torch.uint8, device=flat.device)
        bitmask = (padded.view(-1, 8) * weights).sum(dim=1, dtype=torch.uint8)
        values = _as_bits(flat)[mask].view(flat.dtype)  # integer copy: bit-exact for every float
        return {"bitmask": bitmask, "values": values}, _base_meta(tensor)

    def unpack(self, parts: dict[str, torch.Tensor], meta: dict[str, Any]) -> torch.Tensor:
        shape, dtype = meta_shape_dtype(meta)
        numel = shape.numel()
        bitmask = _check_part(parts, "bitmask", torch.Size([math.ceil(numel / 8)]), torch.uint8)
        weights = torch.tensor(_BIT_WEIGHTS, dtype=torch.uint8, device=bitmask.device)
        bits = (bitmask.view(-1, 1) & weights) != 0
        if bool(bits.reshape(-1)[numel:].any()):
            raise PackingError("part `bitmask` has bits set past the last element.")
        mask = bits.reshape(-1)[:numel]
        values = _check_part(parts, "values", torch.Size([int(mask.sum())]), dtype)
        out = torch.zeros(numel, dtype=dtype, device=bitmask.device)
        _as_bits(out)[mask] = _as_bits(values.to(bitmask.device))  # integer copy: bit-exact for every float
        return out.view(shape)


def choose_codec(tensor: torch.Tensor) -> str:
    """The name of the lossless codec that stores ``tensor`` in the fewest bytes (ties: the earlier registered, so
    ``dense``). Non-float tensors (integer buffers such as BatchNorm's ``num_batches_tracked``) stay dense."""
    return _smallest(tensor)[0]


def packed_nbytes(tensor: torch.Tensor, codec: str | None = None) -> int:
    """The bytes of tensor data ``save_compressed`` writes for ``tensor`` (with ``codec``, else the chosen one)."""
    return get_codec(codec).nbytes(tensor) if codec else _smallest(tensor)[1]


def _smallest(tensor: torch.Tensor) -> tuple[str, int]:
    best, best_bytes = DenseCodec.name, CODECS[DenseCodec.name].nbytes(tensor)
    if not tensor.is_floating_point():
        return best, best_bytes
    for name, codec in CODECS.items():
        if codec.lossless and codec.supports(tensor):
            size = codec.nbytes(tensor)
            if size < best_bytes:
                best, best_bytes = name, size
    return best, best_bytes


def pack(tensor: torch.Tensor, codec: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(parts, {"codec": name, "meta": {...}})``: what a file stores for ``tensor`` (the manifest entry is the
    second item). ``codec`` defaults to :func:`choose_codec`."""
    name = codec or choose_codec(tensor)
    chosen = get_codec(name)
    if not chosen.supports(tensor):
        raise PackingError(f"codec {name!r} cannot store a {dtype_name(tensor.dtype)} tensor.")
    parts, meta = chosen.pack(tensor)
    return parts, {"codec": name, "meta": meta}


def unpack(parts: dict[str, torch.Tensor], entry: dict[str, Any]) -> torch.Tensor:
    """The tensor ``pack`` turned into ``parts`` and ``entry``; raises :class:`PackingError` if they disagree."""
    if not isinstance(entry, dict):
        raise PackingError(f"a tensor entry must be a JSON object with `codec` and `meta`, got {entry!r}.")
    return get_codec(entry.get("codec")).unpack(parts, entry.get("meta"))
