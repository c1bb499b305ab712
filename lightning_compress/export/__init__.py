"""save_compressed / load_compressed: one safetensors file (no pickle) that is really as small as the model.

File layout: every state-dict tensor is stored by the codec :func:`lightning_compress.packing.choose_codec` picks, as
safetensors tensors named ``<tensor>::<part>`` (``net.fc1.weight::bitmask``, ``net.fc1.weight::values``,
``net.fc1.bias::data``). The safetensors metadata holds a versioned JSON manifest under ``"lightning_compress"``::

    {"format": "lightning_compress", "version": 1,
     "model": {"class_path": "pkg.mod.Cls", "module": "pkg.mod", "qualname": "Cls", "init_args": {...} | null,
               "not_rebuildable": "why" (only when init_args is null)},
     "tensors": {"net.fc1.weight": {"codec": "bitmask", "meta": {"shape": [...], "dtype": "float32"},
                                    "sha256": {"bitmask": "...", "values": "..."}}, ...},
     "modules": {"net.fc1": {"class_path": "lightning_compress.quantization.int8.Int8Linear", "module": "...",
                             "qualname": "Int8Linear", "args": {"in_features": 3136, ...}}, ...}}

and its SHA-256 under ``"lightning_compress.sha256"``, so that a flipped byte anywhere is reported, not loaded.
The file's size is the safetensors header plus exactly ``sum(packed_nbytes(t))`` over the state dict.

``modules`` (optional: absent in older files and when there is nothing to record) lists the submodules whose class
is defined under ``lightning_compress.`` and is :class:`lightning_compress.protocol.Rebuildable` (the int8 layers
``convert_to_int8`` puts in place of the float ones, the low-rank layers), with their ``rebuild_args()``. Each is
put in place as ``cls(**args)`` at its qualified name before the state dict is loaded strictly: into the model
rebuilt from the ``model`` record when no skeleton is given, or into the caller's skeleton, so an int8 or low-rank
export loads into a fresh float instance of the user's own class (``load_compressed(path, model=MyModel())``). The
skeleton's layer at that name must exist and hold a dense weight of the recorded layer's shape; one that already is
the recorded layer is kept. A module whose arguments do not survive JSON is recorded with ``"args": null`` and
``"not_rebuildable": "why"``.

What is written is the model as it will run: a layer with an export form (:class:`.swap.ExportsAs`) is written as
that form, so a QAT layer that fake-quantizes is stored as its int8 layer (an ``Int8Linear``'s integers are its
``qweight``, ``net.fc1.qweight``), and the file of a QAT-trained model is the file of ``convert_to_int8(model)``.
The model passed in is not changed.

Who owns what: :mod:`.write` (``save_compressed``, the atomic write), :mod:`.manifest` (the records, encoding and
validation of the manifest), :mod:`.read` (header checks, decoding, ``load_compressed``), :mod:`.rebuild` (trusted
prefixes, imports, rebuilding the model and its recorded modules), :mod:`.swap` (layers put in place by name: the
export view of a model, the recorded modules in a skeleton), :mod:`.errors`.
"""

from lightning_compress.export.errors import CompressedFileError
from lightning_compress.export.errors import CompressedFileExistsError as CompressedFileExistsError
from lightning_compress.export.manifest import FORMAT, SUPPORTED_VERSIONS, VERSION
from lightning_compress.export.manifest import encode_metadata as encode_metadata  # tests forge manifests with it
from lightning_compress.export.read import load_compressed
from lightning_compress.export.write import save_compressed

__all__ = ["FORMAT", "SUPPORTED_VERSIONS", "VERSION", "CompressedFileError", "load_compressed", "save_compressed"]
