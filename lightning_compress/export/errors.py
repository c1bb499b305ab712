"""The exporter's errors, and the one way its messages name the file and list what is wrong."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

MAX_LISTED = 10  # names shown in one message; the rest are counted


class CompressedFileError(ValueError):
    """A compressed file that cannot be written or read as asked; the message names the file and what is valid."""


class CompressedFileExistsError(CompressedFileError, FileExistsError):
    """``save_compressed`` refused to replace an existing file (pass ``overwrite=True``)."""


def fail(source: Path, message: str) -> CompressedFileError:
    """The error for ``source``, its path leading the message."""
    return CompressedFileError(f"{source}: {message}")


def exists_error(target: Path) -> CompressedFileExistsError:
    return CompressedFileExistsError(
        f"{target} already exists and was left as it is."
        " HINT: pass `overwrite=True` to replace it, or choose another path."
    )


def listed(items: Sequence[str], *, quote: bool = True, sep: str = ", ") -> str:
    """The first :data:`MAX_LISTED` of ``items`` (quoted unless ``quote=False``), and how many more there are."""
    shown = sep.join(repr(item) if quote else item for item in items[:MAX_LISTED])
    return shown + (f" and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else "")
