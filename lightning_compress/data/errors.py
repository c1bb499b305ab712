"""The error raised when a bundled data set or model is not installed."""


class MissingDataError(RuntimeError):
    """A data package (or the model a DataModule needs) is not installed; the message says how to install it."""
