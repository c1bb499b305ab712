"""save_compressed / load_compressed and the tensor codecs behind them.

What the tests pin down:
- a 90 %-sparse reference CNN exports to at most 0.2x its dense ``torch.save`` checkpoint and reloads to the same
  outputs, into a skeleton or rebuilt from the file alone;
- every codec round-trips every dtype it stores bit for bit (``bitmask`` up to the sign of zero: ``-0.0`` reads back
  as ``+0.0``), and ``packed_nbytes`` is exactly what the file spends on data; float, int8 and uint8 tensors get the
  smallest lossless codec, other integer tensors stay dense (int8 models: tests/test_export_int8.py);
- a save never leaves a half-written or overwritten file; a bad file is a clear ``CompressedFileError`` that names
  it; a failed load changes nothing; a file cannot make us import a module we did not trust.
"""

from __future__ import annotations

import json
import os
import struct
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
from safetensors import safe_open
from torch import nn

from lightning_compress import packing
from lightning_compress._lightning import LightningModule
from lightning_compress.export import CompressedFileError, encode_metadata, load_compressed, save_compressed
from lightning_compress.lowrank import LowRankConv2d, LowRankLinear
from lightning_compress.models import ImageClassifier
from lightning_compress.packing import (
    CODECS,
    Codec,
    PackingError,
    choose_codec,
    pack,
    packed_nbytes,
    register_codec,
    unpack,
)

# ------------------------------------------------------------------------------------------------------- helpers


def sparse_classifier(sparsity: float = 0.9, seed: int = 0, **kwargs: Any) -> ImageClassifier:
    """The reference CNN with ``sparsity`` of every weight matrix / kernel zeroed by magnitude (biases kept).

    Zeroed by multiplying with a mask, as pruning does: the pruned negative weights become ``-0.0``.
    """
    torch.manual_seed(seed)
    model = ImageClassifier(image_size=28, **kwargs)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() > 1:
                keep = param.numel() - int(sparsity * param.numel())
                threshold = param.abs().flatten().topk(keep).values.min()
                param.mul_(param.abs() >= threshold)
    return model


class MixedNet(nn.Module):
    """A plain nn.Module (no recorded init args) with fp32, fp16 and bf16 weights, BatchNorm buffers (int64 too)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        self.half_fc = nn.Linear(16, 16).half()
        self.bf16_fc = nn.Linear(16, 4).to(torch.bfloat16)
        self.register_buffer("special", torch.tensor([0.0, -0.0, float("nan"), float("inf"), -float("inf"), 1e-45]))


def mixed_net(seed: int = 0) -> MixedNet:
    torch.manual_seed(seed)
    net = MixedNet()
    with torch.no_grad():
        net.conv.weight.mul_(torch.rand_like(net.conv.weight) > 0.8)
        net.half_fc.weight.mul_(torch.rand_like(net.half_fc.weight) > 0.7)
        net.bn.running_mean.normal_()
        net.bn.num_batches_tracked.fill_(7)
    return net


def bits(tensor: torch.Tensor) -> torch.Tensor:
    """The raw bytes of ``tensor``: equal bits means equal tensors, NaN payloads and -0.0 included."""
    return tensor.contiguous().reshape(-1).view(torch.uint8)


def without_negative_zeros(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` with ``-0.0`` as ``+0.0``, every other element's bits kept."""
    if not tensor.is_floating_point():
        return tensor
    return torch.where(tensor == 0, torch.zeros_like(tensor), tensor)


def assert_bit_equal(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    assert torch.equal(bits(actual), bits(expected))


def assert_state_bit_equal(actual: nn.Module, expected: nn.Module) -> None:
    """Equal bit for bit, except that a ``-0.0`` may have been stored (by ``bitmask``) as ``+0.0``."""
    got, want = actual.state_dict(), expected.state_dict()
    assert list(got) == list(want)
    for name in want:
        assert_bit_equal(without_negative_zeros(got[name]), without_negative_zeros(want[name]))


def header_size(path: Path) -> int:
    """The safetensors header: 8 bytes of length, then the JSON (tensor table + our manifest)."""
    with open(path, "rb") as file:
        return 8 + struct.unpack("<Q", file.read(8))[0]


def read_manifest(path: Path) -> dict[str, Any]:
    with safe_open(path, framework="pt") as file:
        return json.loads(file.metadata()["lightning_compress"])


def rewrite(path: Path, edit: Callable[[dict[str, Any]], None] | None = None, drop: tuple[str, ...] = ()) -> None:
    """Rewrite a compressed file as a forger or a buggy writer would: edited manifest, parts dropped."""
    with safe_open(path, framework="pt") as file:
        tensors = {key: file.get_tensor(key) for key in file.keys() if key not in drop}
        manifest = json.loads(file.metadata()["lightning_compress"])
    if edit is not None:
        edit(manifest)
    safetensors.torch.save_file(tensors, path, metadata=encode_metadata(manifest))


@pytest.fixture
def saved(tmp_path: Path) -> tuple[ImageClassifier, Path]:
    model = sparse_classifier()
    path = tmp_path / "model.safetensors"
    save_compressed(model, path)
    return model, path


# ------------------------------------------------------------------------------------- the sparse reference CNN


@pytest.mark.parametrize("rebuild", [False, True], ids=["into_skeleton", "rebuilt_from_manifest"])
def test_90_percent_sparse_cnn_is_at_most_a_fifth_of_dense_and_reloads_exactly(tmp_path: Path, rebuild: bool) -> None:
    model = sparse_classifier(0.9).eval()
    assert sum(p.numel() for p in model.parameters()) == 421_642
    dense_path, packed_path = tmp_path / "dense.pt", tmp_path / "packed.safetensors"
    torch.save(model.state_dict(), dense_path)
    written = save_compressed(model, packed_path)

    assert written == packed_path.stat().st_size
    ratio = written / dense_path.stat().st_size
    assert ratio <= 0.2, f"compressed/dense bytes = {written}/{dense_path.stat().st_size} = {ratio:.3f} > 0.2"
    print(f"\n90%-sparse reference CNN: compressed/dense = {ratio:.3f} ({written} / {dense_path.stat().st_size} bytes)")

    skeleton = None if rebuild else ImageClassifier(image_size=28)
    loaded = load_compressed(packed_path, skeleton)
    assert type(loaded) is ImageClassifier and not loaded.training
    if skeleton is not None:
        assert loaded is skeleton
    assert loaded.hparams == model.hparams
    batch = torch.randn(16, 1, 28, 28)
    with torch.no_grad():
        diff = (loaded(batch) - model(batch)).abs().max().item()
    assert diff <= 1e-6, f"max |reloaded - original| = {diff}"
    assert diff == 0.0
    assert_state_bit_equal(loaded, model)


def test_manifest_records_format_version_class_and_init_args(saved: tuple[ImageClassifier, Path]) -> None:
    model, path = saved
    manifest = read_manifest(path)
    assert manifest["format"] == "lightning_compress" and manifest["version"] == 1
    assert manifest["model"]["class_path"] == "lightning_compress.models.classifier.ImageClassifier"
    assert manifest["model"]["init_args"] == dict(model.hparams)
    assert manifest["tensors"]["net.fc1.weight"]["codec"] == "bitmask"
    assert manifest["tensors"]["net.fc1.bias"]["codec"] == "dense"
    with safe_open(path, framework="pt") as file:
        assert {"net.fc1.weight::bitmask", "net.fc1.weight::values", "net.fc1.bias::data"} <= set(file.keys())


def test_a_plain_module_round_trips_every_dtype_and_buffer_bit_exactly(tmp_path: Path) -> None:
    net = mixed_net(seed=1)
    path = tmp_path / "mixed.safetensors"
    save_compressed(net, path)
    manifest = read_manifest(path)
    assert manifest["model"]["init_args"] is None
    assert "save_hyperparameters" in manifest["model"]["not_rebuildable"]
    assert manifest["tensors"]["bn.num_batches_tracked"]["codec"] == "dense"

    skeleton = MixedNet()
    loaded = load_compressed(path, skeleton)
    assert loaded is skeleton and not loaded.training
    assert_state_bit_equal(loaded, net)


class MyModel(nn.Module):
    """A user's own class: a plain nn.Module (the file cannot rebuild it), a convolution and two Linear layers."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc1 = nn.Linear(8 * 4 * 4, 32)
        self.fc2 = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(torch.relu(self.conv(x)).flatten(1))))


def test_a_low_rank_export_loads_into_a_fresh_instance_of_the_users_class(tmp_path: Path) -> None:
    """The recorded low-rank layers are built and put in place of the fresh model's dense ones, then the state dict
    is loaded strictly."""
    torch.manual_seed(0)
    model = MyModel()
    model.conv = LowRankConv2d.from_conv2d(model.conv)[0]
    model.fc1 = LowRankLinear.from_linear(model.fc1)[0]
    path = tmp_path / "low_rank.safetensors"
    save_compressed(model, path)
    assert set(read_manifest(path)["modules"]) == {"conv", "fc1"}
    fresh = MyModel()
    assert load_compressed(path, model=fresh) is fresh
    assert [type(fresh.conv), type(fresh.fc1), type(fresh.fc2)] == [LowRankConv2d, LowRankLinear, nn.Linear]
    assert_state_bit_equal(fresh, model)
    x = torch.randn(8, 3, 4, 4)
    with torch.no_grad():
        assert torch.equal(bits(fresh(x)), bits(model.eval()(x)))


def test_file_size_is_header_plus_the_sum_of_packed_nbytes(tmp_path: Path) -> None:
    for name, model in {"cnn": sparse_classifier(0.9), "mixed": mixed_net()}.items():
        path = tmp_path / f"{name}.safetensors"
        written = save_compressed(model, path)
        data = sum(packed_nbytes(tensor) for tensor in model.state_dict().values())
        assert written == path.stat().st_size == header_size(path) + data


# ------------------------------------------------------------------------------------------------------ codecs


def _cases() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    sparse = torch.randn(7, 13) * (torch.rand(7, 13) > 0.9)
    return {
        "fp32_sparse": sparse,
        "fp32_dense": torch.randn(5, 3, 2),
        "fp16": sparse.half(),
        "bf16": sparse.to(torch.bfloat16),
        "fp64": sparse.double(),
        "int64_buffer": torch.tensor(12345),
        "int32_sparse": torch.tensor([0, 0, 5, 0, -3, 0, 0, 0, 0, 1], dtype=torch.int32),
        "uint8": torch.tensor([0, 255, 0, 7], dtype=torch.uint8),
        "int8_sparse": torch.tensor([[0, -128, 0, 0, 127], [0, 0, 0, 5, 0], [-1, 0, 0, 0, 0]], dtype=torch.int8),
        "int8_4bit": torch.tensor([-8, 7, 0, 3, -1, 0, 0, 2, -8], dtype=torch.int8),
        "int8_4bit_sparse": torch.tensor([0, 0, 0, -8, 0, 0, 0, 0, 0, 7, 0, 0, 0, 0, 0, 0, -3], dtype=torch.int8),
        "bool": torch.tensor([[True, False], [False, False]]),
        "empty": torch.zeros(0),
        "empty_2d_bf16": torch.zeros(3, 0, dtype=torch.bfloat16),
        "all_zero": torch.zeros(4, 9),
        "scalar": torch.tensor(2.5),
        "scalar_zero": torch.tensor(0.0),
        "specials": torch.tensor([0.0, -0.0, float("nan"), -float("nan"), float("inf"), 1e-45, 0.0, 0.0, 3.0]),
        "float8": torch.tensor([0.0, 1.0, 0.0, -2.0]).to(torch.float8_e4m3fn),
        "non_contiguous": torch.randn(6, 4).t(),
    }


CASES = _cases()


@pytest.mark.parametrize("codec", sorted(name for name, codec in CODECS.items() if codec.lossless))
@pytest.mark.parametrize("case", sorted(CASES))
def test_every_lossless_codec_round_trips_bit_exactly_and_counts_its_bytes(codec: str, case: str) -> None:
    tensor = CASES[case]
    if not CODECS[codec].supports(tensor):
        pytest.skip(f"{codec} does not store {tensor.dtype}")
    parts, entry = pack(tensor, codec)
    assert entry["codec"] == codec
    json.dumps(entry)  # the manifest entry is JSON as it is
    assert packed_nbytes(tensor, codec) == sum(p.numel() * p.element_size() for p in parts.values())
    expected = tensor if codec == "dense" else without_negative_zeros(tensor)
    assert_bit_equal(unpack(parts, entry), expected)


def test_dense_keeps_negative_zeros_and_bitmask_counts_them_as_pruned() -> None:
    tensor = torch.tensor([-0.0, 0.0, -0.0, -1.5, 0.0, -0.0, 0.0, -0.0, 2.0])
    assert_bit_equal(unpack(*pack(tensor, "dense")), tensor)
    parts, entry = pack(tensor, "bitmask")
    assert parts["values"].tolist() == [-1.5, 2.0]
    restored = unpack(parts, entry)
    assert torch.equal(restored, tensor)  # IEEE-equal everywhere
    assert not restored.signbit()[[0, 2, 5, 7]].any()  # the zeros come back as +0.0


def test_a_nan_payload_survives_the_bitmask_codec() -> None:
    tensor = torch.tensor([0x7FC00001, 0, 0, 0, 0, 0, 0, 0, 0, 0], dtype=torch.int32).view(torch.float32)
    parts, entry = pack(tensor, "bitmask")
    assert_bit_equal(unpack(parts, entry), tensor)


def test_bitmask_is_one_bit_per_element_plus_the_non_zero_values() -> None:
    tensor = torch.zeros(1000)
    tensor[::10] = 1.0
    parts, _ = pack(tensor, "bitmask")
    assert parts["bitmask"].dtype == torch.uint8 and parts["bitmask"].numel() == 125
    assert parts["values"].shape == (100,) and parts["values"].dtype == torch.float32
    assert packed_nbytes(tensor) == 125 + 100 * 4


@pytest.mark.parametrize("case", sorted(CASES))
def test_choose_codec_picks_the_smaller_and_packed_nbytes_matches_pack(case: str) -> None:
    tensor = CASES[case]
    chosen = choose_codec(tensor)
    parts, entry = pack(tensor)
    assert entry["codec"] == chosen
    assert packed_nbytes(tensor) == sum(p.numel() * p.element_size() for p in parts.values())
    sizes = {name: codec.nbytes(tensor) for name, codec in CODECS.items() if codec.lossless and codec.supports(tensor)}
    if tensor.is_floating_point() or tensor.dtype in (torch.int8, torch.uint8):
        assert packed_nbytes(tensor) == min(sizes.values())
    else:
        assert chosen == "dense"


def test_choose_codec_keeps_ties_and_integer_buffers_dense() -> None:
    tie = torch.tensor([1, 1, 1, 1, 1, 1, 1, 0], dtype=torch.uint8).to(torch.float8_e4m3fn)  # 1 + 7 == 8 bytes
    assert CODECS["bitmask"].nbytes(tie) == CODECS["dense"].nbytes(tie) == 8
    assert choose_codec(tie) == "dense"
    assert choose_codec(torch.zeros(0)) == "dense"
    assert choose_codec(torch.zeros(1000, dtype=torch.int64)) == "dense"  # would be 125 bytes as a bitmask
    assert choose_codec(torch.zeros(1000)) == "bitmask"
    assert choose_codec(torch.randn(1000)) == "dense"


def test_a_new_codec_is_one_registered_class(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(packing, "CODECS", dict(packing.CODECS))

    @register_codec
    class Bytes(Codec):
        """A lossy-flagged toy codec: never chosen automatically, used by name."""

        name = "toy_bytes"
        lossless = False
        parts = ("raw",)

        def nbytes(self, tensor: torch.Tensor) -> int:
            return tensor.numel() * tensor.element_size()

        def pack(self, tensor: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
            return {"raw": bits(tensor).clone()}, {"shape": list(tensor.shape), "dtype": "float32"}

        def unpack(self, parts: dict[str, torch.Tensor], meta: dict[str, Any]) -> torch.Tensor:
            return parts["raw"].view(torch.float32).reshape(meta["shape"])

    tensor = torch.zeros(64)
    assert choose_codec(tensor) == "bitmask"  # a lossy codec is never picked on its own
    parts, entry = pack(tensor, "toy_bytes")
    assert_bit_equal(unpack(parts, entry), tensor)
    with pytest.raises(ValueError, match="already registered"):
        register_codec(Bytes)


def test_codec_errors_are_clear() -> None:
    with pytest.raises(
        PackingError, match=r"unknown codec 'zstd'; known codecs: \['bitmask', 'bitmask_int4', 'dense', 'int4'\]"
    ):
        pack(torch.zeros(3), "zstd")
    parts, entry = pack(torch.tensor([0.0, 1.0, 2.0]), "bitmask")
    with pytest.raises(PackingError, match=r"part `values` is float32\[1\], expected float32\[2\]"):
        unpack({**parts, "values": parts["values"][:1]}, entry)
    with pytest.raises(PackingError, match="part `bitmask` is missing"):
        unpack({"values": parts["values"]}, entry)
    with pytest.raises(PackingError, match="unknown dtype 'float33'"):
        unpack(parts, {"codec": "bitmask", "meta": {"shape": [3], "dtype": "float33"}})


# ------------------------------------------------------------------------------------------------- save errors


def test_an_existing_file_is_refused_untouched_unless_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"precious bytes")
    with pytest.raises(CompressedFileError, match=rf"{path} already exists.*`overwrite=True`"):
        save_compressed(sparse_classifier(), path)
    with pytest.raises(FileExistsError):  # the same error is a FileExistsError too
        save_compressed(sparse_classifier(), os.fspath(path))
    assert path.read_bytes() == b"precious bytes"
    assert os.listdir(tmp_path) == ["model.safetensors"]

    written = save_compressed(sparse_classifier(), path, overwrite=True)
    assert written == path.stat().st_size
    assert_state_bit_equal(load_compressed(path), sparse_classifier())


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_the_file_gets_the_permissions_of_a_plain_open_under_the_umask(tmp_path: Path, umask: int) -> None:
    path = tmp_path / "model.safetensors"
    before = os.umask(umask)
    try:
        save_compressed(sparse_classifier(), path)
        plain = tmp_path / "plain.txt"
        plain.write_text("x")
    finally:
        os.umask(before)
    assert path.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777 == 0o666 & ~umask


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_failure_while_writing_leaves_no_file_and_the_old_one_untouched(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, overwrite: bool
) -> None:
    old = tmp_path / "old.safetensors"
    save_compressed(sparse_classifier(seed=1), old)
    before = old.read_bytes()

    def crash(tensors: dict[str, torch.Tensor], filename: str, metadata: dict[str, str] | None = None) -> None:
        Path(filename).write_bytes(b"half a file")
        raise OSError("No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    target = old if overwrite else tmp_path / "new.safetensors"
    with pytest.raises(OSError, match="No space left"):
        save_compressed(sparse_classifier(seed=2), target, overwrite=overwrite)
    assert old.read_bytes() == before
    assert os.listdir(tmp_path) == ["old.safetensors"]  # no temp file left behind, no new file


def test_save_rejects_bad_arguments_clearly(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="`model` must be a torch.nn.Module"):
        save_compressed({"weight": torch.zeros(2)}, tmp_path / "a.safetensors")  # type: ignore[arg-type]
    with pytest.raises(CompressedFileError, match=r"folder .*missing does not exist"):
        save_compressed(sparse_classifier(), tmp_path / "missing" / "a.safetensors")
    with pytest.raises(CompressedFileError, match="it is a folder"):
        save_compressed(sparse_classifier(), tmp_path)
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------------------------------------- load errors


def test_a_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.safetensors"
    with pytest.raises(CompressedFileError, match=rf"{path}: no such file"):
        load_compressed(path)


@pytest.mark.parametrize("keep", [0, 5, 8, 40, "header", "half", "all_but_one"])
def test_a_truncated_file(saved: tuple[ImageClassifier, Path], keep: int | str) -> None:
    _, path = saved
    data = path.read_bytes()
    cut = {"header": header_size(path), "half": len(data) // 2, "all_but_one": len(data) - 1}.get(keep, keep)
    path.write_bytes(data[:cut])
    with pytest.raises(CompressedFileError, match=rf"{path}: is truncated"):
        load_compressed(path)


def test_corrupted_tensor_bytes_are_reported_not_loaded(saved: tuple[ImageClassifier, Path]) -> None:
    _, path = saved
    data = bytearray(path.read_bytes())
    data[header_size(path) + 1000] ^= 0x01
    path.write_bytes(bytes(data))
    skeleton = ImageClassifier(image_size=28)
    before = {k: v.clone() for k, v in skeleton.state_dict().items()}
    with pytest.raises(CompressedFileError, match=r"is corrupted: part '\w+' of tensor '[\w.]+' does not match"):
        load_compressed(path, skeleton)
    assert all(torch.equal(bits(before[k]), bits(v)) for k, v in skeleton.state_dict().items())


def test_corrupted_manifest_bytes_are_reported(saved: tuple[ImageClassifier, Path]) -> None:
    _, path = saved
    data = path.read_bytes()
    assert data.count(b'\\"lr\\":0.001') == 1
    path.write_bytes(data.replace(b'\\"lr\\":0.001', b'\\"lr\\":0.002'))
    with pytest.raises(CompressedFileError, match="is corrupted: its manifest does not match its SHA-256"):
        load_compressed(path)


def test_trailing_garbage_is_corruption(saved: tuple[ImageClassifier, Path]) -> None:
    _, path = saved
    path.write_bytes(path.read_bytes() + b"\0" * 3)
    with pytest.raises(CompressedFileError, match="is corrupted: 3 bytes follow the last tensor"):
        load_compressed(path)


def test_not_a_lightning_compress_file(tmp_path: Path) -> None:
    plain = tmp_path / "plain.safetensors"
    safetensors.torch.save_file(ImageClassifier(image_size=28).state_dict(), plain)
    with pytest.raises(CompressedFileError, match=r"plain.safetensors: is not a lightning_compress file.*load_file"):
        load_compressed(plain)

    pickled = tmp_path / "model.ckpt"
    torch.save(ImageClassifier(image_size=28).state_dict(), pickled)
    with pytest.raises(CompressedFileError, match=r"model.ckpt: is not a safetensors file"):
        load_compressed(pickled)

    other = tmp_path / "other.safetensors"
    safetensors.torch.save_file({"x": torch.zeros(1)}, other, metadata={"lightning_compress": '{"format": "gguf"}'})
    with pytest.raises(CompressedFileError, match=r"manifest `format` is 'gguf', expected 'lightning_compress'"):
        load_compressed(other)


def test_an_unknown_manifest_version_names_the_supported_ones(saved: tuple[ImageClassifier, Path]) -> None:
    _, path = saved
    rewrite(path, lambda manifest: manifest.update(version=2))
    with pytest.raises(CompressedFileError, match=r"manifest version 2; this lightning_compress reads versions \[1\]"):
        load_compressed(path)


def test_missing_parts_are_named(saved: tuple[ImageClassifier, Path]) -> None:
    _, path = saved
    rewrite(path, drop=("net.fc1.weight::values",))
    with pytest.raises(
        CompressedFileError, match=r"is missing 1 part\(s\) its manifest lists: 'net.fc1.weight::values'"
    ):
        load_compressed(path, ImageClassifier(image_size=28))


def test_an_unknown_codec_is_named(saved: tuple[ImageClassifier, Path]) -> None:
    _, path = saved
    rewrite(path, lambda manifest: manifest["tensors"]["net.fc2.bias"].update(codec="zstd"))
    with pytest.raises(CompressedFileError, match=r"tensor 'net.fc2.bias': unknown codec 'zstd'"):
        load_compressed(path)


@pytest.mark.parametrize(
    ("skeleton", "match"),
    [
        (lambda: ImageClassifier(image_size=28, num_classes=5), r"'net.fc2.weight' is float32\[10, 128\] in the file"),
        (lambda: ImageClassifier(image_size=28).half(), r"'net.conv1.weight' is float32\[32, 1, 3, 3\] in the file"),
        (lambda: MixedNet(), r"the model has \d+ tensor\(s\) the file lacks: 'bf16_fc.bias'"),
    ],
    ids=["shape", "dtype", "keys"],
)
def test_a_mismatched_skeleton_is_refused_and_left_unchanged(
    saved: tuple[ImageClassifier, Path], skeleton: Callable[[], nn.Module], match: str
) -> None:
    _, path = saved
    model = skeleton()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CompressedFileError, match=rf"{path}: does not fit \w+ \(nothing was loaded\): .*{match}"):
        load_compressed(path, model)
    after = model.state_dict()
    assert all(torch.equal(bits(before[k]), bits(after[k])) for k in before)
    assert model.training  # not even switched to eval


def test_no_recorded_init_args_and_no_skeleton(tmp_path: Path) -> None:
    path = tmp_path / "mixed.safetensors"
    save_compressed(mixed_net(), path)
    with pytest.raises(
        CompressedFileError,
        match=r"cannot rebuild tests?.*MixedNet without a skeleton: .*save_hyperparameters.*model=MixedNet\(...\)",
    ):
        load_compressed(path)


def test_a_class_path_outside_the_trusted_prefixes_is_never_imported(
    saved: tuple[ImageClassifier, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, path = saved
    marker = tmp_path / "imported.txt"
    module = f"lc_untrusted_{uuid.uuid4().hex[:8]}"
    site = tmp_path / "site"
    site.mkdir()
    (site / f"{module}.py").write_text(
        "from pathlib import Path\n"
        f"Path({os.fspath(marker)!r}).write_text('imported')\n"
        "from lightning_compress.models import ImageClassifier\n\n"
        "class Net(ImageClassifier):\n"
        "    pass\n"
    )
    monkeypatch.syspath_prepend(os.fspath(site))
    rewrite(path, lambda m: m["model"].update(module=module, qualname="Net", class_path=f"{module}.Net"))

    for trusted in ([], ["lc_untrusted"], [f"{module}_other"]):  # a prefix trusts whole path components only
        with pytest.raises(
            CompressedFileError,
            match=rf"{module}\.Net, which is outside the trusted prefixes .*nothing was imported.*"
            rf"trusted_prefixes=\['{module}'\]",
        ):
            load_compressed(path, trusted_prefixes=trusted)
        assert not marker.exists() and module not in sys.modules

    loaded = load_compressed(path, trusted_prefixes=[module])
    assert marker.exists() and type(loaded).__name__ == "Net"
    assert_state_bit_equal(loaded, model)
    monkeypatch.delitem(sys.modules, module)


def test_a_trusted_class_must_be_an_nn_module(saved: tuple[ImageClassifier, Path]) -> None:
    _, path = saved
    rewrite(path, lambda m: m["model"].update(module="lightning_compress.export", qualname="CompressedFileError"))
    with pytest.raises(CompressedFileError, match="CompressedFileError, which is not a torch.nn.Module subclass"):
        load_compressed(path)


def test_trusted_prefixes_must_be_a_list_not_a_string(saved: tuple[ImageClassifier, Path]) -> None:
    _, path = saved
    with pytest.raises(TypeError, match=r"`trusted_prefixes` must be a list .*trusted_prefixes=\['my_pkg'\]"):
        load_compressed(path, trusted_prefixes="my_pkg")
    with pytest.raises(ValueError, match="each must be a dotted module path"):
        load_compressed(path, trusted_prefixes=["my pkg"])


class TupleArgsModule(LightningModule):
    """Calls save_hyperparameters(), but a tuple does not survive JSON (it would come back as a list)."""

    def __init__(self, sizes: tuple[int, int] = (4, 2)) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.fc = nn.Linear(*sizes)


def test_init_args_that_are_not_json_are_not_recorded(tmp_path: Path) -> None:
    path = tmp_path / "tuple.safetensors"
    save_compressed(TupleArgsModule((3, 5)), path)
    record = read_manifest(path)["model"]
    assert record["init_args"] is None and "['sizes'] are not JSON-serialisable" in record["not_rebuildable"]
    with pytest.raises(CompressedFileError, match=r"cannot rebuild .*TupleArgsModule without a skeleton: its hyper"):
        load_compressed(path, trusted_prefixes=[TupleArgsModule.__module__])
    assert isinstance(load_compressed(path, TupleArgsModule((3, 5))), TupleArgsModule)
