"""The error raised when a bundled data set or model is not installed (its home is ``lightning_compress._installed``,
which the models use too; ``lightning_compress.data.MissingDataError`` is the public name)."""

from lightning_compress._installed import MissingDataError

__all__ = ["MissingDataError"]
