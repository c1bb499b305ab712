"""Tensor codecs: one tensor <-> named parts (tensors) + JSON-able metadata.

``save_compressed`` stores each state-dict tensor with the codec :func:`choose_codec` picks, and the monitor reports
:func:`packed_nbytes` as ``compress/bytes_compressed``: both go through this file, so the number logged during
training is the number of tensor bytes in the exported file (the file adds only its header).

A codec is one class registered with :func:`register_codec`. Lossless codecs (``lossless = True``) take part in the
automatic choice; a lossy one (int8, low-rank factors) is used only when asked for by name. The automatic choice
considers floating-point tensors and ``int8`` / ``uint8`` tensors (the weights of int8 layers); other integer and
boolean tensors (BatchNorm's ``num_batches_tracked``, masks) stay dense.

- ``dense``: the tensor as it is (part ``data``), bit for bit.
- ``bitmask``: a packed bit mask of the non-zero elements, 1 bit per element, most significant bit first (part
  ``bitmask``, ``uint8``), and those elements in order (part ``values``, 1-D, the tensor's dtype), copied as raw
  bits. Every non-zero element (NaN payloads, infinities, subnormals) reads back bit for bit; a zero reads back as
  ``+0.0``: ``-0.0`` (IEEE-equal to ``0.0``) counts as zero, because pruning by ``weight.mul_(mask)`` turns every
  pruned negative weight into ``-0.0`` and remembering those signs would cost one more bit per pruned weight.
  A sparse int8 weight costs 1 bit per element + 1 byte per non-zero.
- ``int4``: an ``int8`` tensor whose values all lie in [-8, 7] (weights trained with ``weight_bits <= 4``), two
  elements per byte (part ``nibbles``, ``uint8``, ``ceil(numel / 2)`` bytes): the first element of each pair in the
  high nibble, each as 4-bit two's complement; an odd count leaves the last low nibble zero.
- ``bitmask_int4``: ``bitmask``'s bit mask (part ``bitmask``) plus the non-zero elements as ``int4`` nibbles (part
  ``nibbles``): a sparse low-bit weight costs 1 bit per element + half a byte per non-zero.

"Lossless" means that much: ``unpack(*pack(t))`` equals ``t`` element for element, bit-exact up to the sign of zero.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch

__all__ = [
    "CODECS",
    "BitmaskCodec",
    "BitmaskInt4Codec",
    "Codec",
    "DenseCodec",
    "Int4Codec",
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
    stores: ClassVar[str] = ""
    """What :meth:`supports` accepts, in words (for error messages); empty: any tensor."""

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


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """A 1-D bool tensor as bits, 8 to a byte, most significant bit first, the last byte padded with zeros."""
    padded = torch.zeros(math.ceil(mask.numel() / 8) * 8, dtype=torch.uint8, device=mask.device)
    padded[: mask.numel()] = mask
    weights = torch.tensor(_BIT_WEIGHTS, dtype=torch.uint8, device=mask.device)
    return (padded.view(-1, 8) * weights).sum(dim=1, dtype=torch.uint8)


def _unpack_mask(parts: dict[str, torch.Tensor], numel: int) -> torch.Tensor:
    """The 1-D bool mask of ``numel`` elements stored in part ``bitmask``, validated."""
    return unpack_mask(_check_part(parts, "bitmask", torch.Size([math.ceil(numel / 8)]), torch.uint8), numel)


def unpack_mask(bitmask: torch.Tensor, numel: int) -> torch.Tensor:
    """The 1-D bool mask of ``numel`` elements that :func:`pack_mask` packed into ``bitmask``."""
    if bitmask.dtype != torch.uint8 or bitmask.shape != (math.ceil(numel / 8),):
        raise PackingError(f"a packed mask of {numel} elements is {math.ceil(numel / 8)} uint8 bytes; got"
                           f" {tuple(bitmask.shape)} {bitmask.dtype}.")  # fmt: skip
    weights = torch.tensor(_BIT_WEIGHTS, dtype=torch.uint8, device=bitmask.device)
    bits = ((bitmask.view(-1, 1) & weights) != 0).reshape(-1)
    if bool(bits[numel:].any()):
        raise PackingError("part `bitmask` has bits set past the last element.")
    return bits[:numel]


@register_codec
class BitmaskCodec(Codec):
    """A packed bit mask of the non-zero elements plus their values: ``ceil(numel/8) + nnz * itemsize`` bytes."""

    name = "bitmask"
    parts = ("bitmask", "values")
    stores = "real tensors of 1, 2, 4 or 8 bytes per element"

    def supports(self, tensor: torch.Tensor) -> bool:
        return not tensor.is_complex() and tensor.element_size() in _SAME_SIZE_INT

    def nbytes(self, tensor: torch.Tensor) -> int:
        nnz = int((tensor.detach() != 0).sum())  # -0.0 counts as zero, NaN as non-zero
        return math.ceil(tensor.numel() / 8) + nnz * tensor.element_size()

    def pack(self, tensor: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        flat = tensor.detach().reshape(-1)
        mask = flat != 0
        values = _as_bits(flat)[mask].view(flat.dtype)  # integer copy: bit-exact for every float
        return {"bitmask": pack_mask(mask), "values": values}, _base_meta(tensor)

    def unpack(self, parts: dict[str, torch.Tensor], meta: dict[str, Any]) -> torch.Tensor:
        shape, dtype = meta_shape_dtype(meta)
        mask = _unpack_mask(parts, shape.numel())
        values = _check_part(parts, "values", torch.Size([int(mask.sum())]), dtype)
        out = torch.zeros(shape.numel(), dtype=dtype, device=mask.device)
        _as_bits(out)[mask] = _as_bits(values.to(mask.device))  # integer copy: bit-exact for every float
        return out.view(shape)


INT4_MIN, INT4_MAX = -8, 7


def _fits_int4(tensor: torch.Tensor) -> bool:
    if tensor.dtype != torch.int8:
        return False
    if tensor.numel() == 0:
        return True
    low, high = torch.aminmax(tensor.detach())
    return int(low) >= INT4_MIN and int(high) <= INT4_MAX


def _pack_nibbles(values: torch.Tensor) -> torch.Tensor:
    """1-D int8 values in [-8, 7] as 4-bit two's complement, two to a byte, the first of each pair high."""
    nibbles = torch.zeros(math.ceil(values.numel() / 2) * 2, dtype=torch.uint8, device=values.device)
    nibbles[: values.numel()] = values.view(torch.uint8) & 0x0F
    pairs = nibbles.view(-1, 2)
    return (pairs[:, 0] << 4) | pairs[:, 1]


def _unpack_nibbles(packed: torch.Tensor, count: int, part: str) -> torch.Tensor:
    """The ``count`` int8 values :func:`_pack_nibbles` stored in ``packed`` (part ``part``), sign-extended."""
    nibbles = torch.stack((packed >> 4, packed & 0x0F), dim=1).reshape(-1)
    if bool(nibbles[count:].any()):
        raise PackingError(f"part `{part}` has a non-zero nibble past the last element.")
    return ((nibbles[:count] ^ 8).to(torch.int8) - 8).to(torch.int8)  # sign-extend: 8..15 -> -8..-1


@register_codec
class Int4Codec(Codec):
    """An int8 tensor with every value in [-8, 7] as 4-bit nibbles, two per byte: ``ceil(numel/2)`` bytes."""

    name = "int4"
    parts = ("nibbles",)
    stores = f"int8 tensors whose values all lie in [{INT4_MIN}, {INT4_MAX}]"

    def supports(self, tensor: torch.Tensor) -> bool:
        return _fits_int4(tensor)

    def nbytes(self, tensor: torch.Tensor) -> int:
        return math.ceil(tensor.numel() / 2)

    def pack(self, tensor: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return {"nibbles": _pack_nibbles(tensor.detach().reshape(-1))}, _base_meta(tensor)

    def unpack(self, parts: dict[str, torch.Tensor], meta: dict[str, Any]) -> torch.Tensor:
        shape, dtype = meta_shape_dtype(meta)
        _check_int8(dtype, self.name)
        numel = shape.numel()
        packed = _check_part(parts, "nibbles", torch.Size([math.ceil(numel / 2)]), torch.uint8)
        return _unpack_nibbles(packed, numel, "nibbles").view(shape)


@register_codec
class BitmaskInt4Codec(Codec):
    """``bitmask``'s mask plus the non-zero values as ``int4`` nibbles: ``ceil(numel/8) + ceil(nnz/2)`` bytes."""

    name = "bitmask_int4"
    parts = ("bitmask", "nibbles")
    stores = Int4Codec.stores

    def supports(self, tensor: torch.Tensor) -> bool:
        return _fits_int4(tensor)

    def nbytes(self, tensor: torch.Tensor) -> int:
        return math.ceil(tensor.numel() / 8) + math.ceil(int(torch.count_nonzero(tensor.detach())) / 2)

    def pack(self, tensor: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        flat = tensor.detach().reshape(-1)
        mask = flat != 0
        return {"bitmask": pack_mask(mask), "nibbles": _pack_nibbles(flat[mask])}, _base_meta(tensor)

    def unpack(self, parts: dict[str, torch.Tensor], meta: dict[str, Any]) -> torch.Tensor:
        shape, dtype = meta_shape_dtype(meta)
        _check_int8(dtype, self.name)
        mask = _unpack_mask(parts, shape.numel())
        nnz = int(mask.sum())
        packed = _check_part(parts, "nibbles", torch.Size([math.ceil(nnz / 2)]), torch.uint8)
        values = _unpack_nibbles(packed.to(mask.device), nnz, "nibbles")
        if bool((values == 0).any()):
            raise PackingError("part `nibbles` holds a zero where the bit mask marks a non-zero element.")
        out = torch.zeros(shape.numel(), dtype=torch.int8, device=mask.device)
        out[mask] = values
        return out.view(shape)


def _check_int8(dtype: torch.dtype, codec: str) -> None:
    if dtype != torch.int8:
        raise PackingError(f"codec {codec!r} stores int8 tensors only, the metadata says {dtype_name(dtype)}.")


_AUTO_INTEGER_DTYPES = (torch.int8, torch.uint8)
"""Integer dtypes the automatic choice packs (int8 weights); wider integers and bools stay dense."""


def choose_codec(tensor: torch.Tensor) -> str:
    """The name of the lossless codec that stores ``tensor`` in the fewest bytes (ties: the earlier registered, so
    ``dense``). Floating-point, ``int8`` and ``uint8`` tensors are packed; other integer and boolean tensors (buffers
    such as BatchNorm's ``num_batches_tracked``) stay dense."""
    return _smallest(tensor)[0]


def packed_nbytes(tensor: torch.Tensor, codec: str | None = None) -> int:
    """The bytes of tensor data ``save_compressed`` writes for ``tensor`` (with ``codec``, else the chosen one)."""
    return get_codec(codec).nbytes(tensor) if codec else _smallest(tensor)[1]


def _smallest(tensor: torch.Tensor) -> tuple[str, int]:
    best, best_bytes = DenseCodec.name, CODECS[DenseCodec.name].nbytes(tensor)
    if not (tensor.is_floating_point() or tensor.dtype in _AUTO_INTEGER_DTYPES):
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
        stores = f" (it stores {chosen.stores})" if chosen.stores else ""
        raise PackingError(
            f"codec {name!r} cannot store this {dtype_name(tensor.dtype)}{list(tensor.shape)} tensor{stores}."
        )
    parts, meta = chosen.pack(tensor)
    return parts, {"codec": name, "meta": meta}


def unpack(parts: dict[str, torch.Tensor], entry: dict[str, Any]) -> torch.Tensor:
    """The tensor ``pack`` turned into ``parts`` and ``entry``; raises :class:`PackingError` if they disagree."""
    if not isinstance(entry, dict):
        raise PackingError(f"a tensor entry must be a JSON object with `codec` and `meta`, got {entry!r}.")
    return get_codec(entry.get("codec")).unpack(parts, entry.get("meta"))
