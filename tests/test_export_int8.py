"""save_compressed / load_compressed for int8 models (``convert_to_int8``), and the integer codecs behind them.

What the tests pin down:
- a pruned, QAT-trained, converted ImageClassifier saves to one file that loads *without a skeleton* (the manifest
  records each int8 layer's class and constructor arguments) and computes bit for bit what the converted model does;
- its int8 weights are stored packed: pruned weights are integer zeros in a bit mask (1 bit per element + 1 byte per
  non-zero), 4-bit weights as nibbles (half a byte per element), so the file is a fraction of the float sparse export;
- a forged module record (unknown name, bad arguments, untrusted class) is a clear ``CompressedFileError`` naming the
  file and the module, and nothing is imported or loaded;
- the ``int4`` and ``bitmask_int4`` codecs round-trip every value they accept exactly and count their bytes.
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

from lightning_compress import QuantizationAwareTraining, convert_to_int8
from lightning_compress._lightning import LightningModule, pl
from lightning_compress.data import DigitsDataModule
from lightning_compress.export import CompressedFileError, encode_metadata, load_compressed, save_compressed
from lightning_compress.lowrank import LowRankLinear
from lightning_compress.models import ImageClassifier
from lightning_compress.monitor.measure import measure_model
from lightning_compress.packing import CODECS, PackingError, choose_codec, pack, packed_nbytes, unpack
from lightning_compress.protocol import Rebuildable
from lightning_compress.quantization import Int8Conv1d, Int8Conv2d, Int8Linear, QATLinear

INT8_LAYERS = {"net.conv1": Int8Conv2d, "net.conv2": Int8Conv2d, "net.fc1": Int8Linear, "net.fc2": Int8Linear}

# ------------------------------------------------------------------------------------------------------- helpers


def pruned_classifier(sparsity: float, seed: int = 0) -> ImageClassifier:
    """The reference CNN (421,642 parameters) with ``sparsity`` of every weight zeroed by magnitude, as pruning does
    (multiplying by a mask); biases kept."""
    torch.manual_seed(seed)
    model = ImageClassifier(image_size=28)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() > 1 and sparsity > 0:
                keep = param.numel() - int(sparsity * param.numel())
                threshold = param.abs().flatten().topk(keep).values.min()
                param.mul_(param.abs() >= threshold)
    return model


def qat_int8(model: nn.Module, weight_bits: int = 8, seed: int = 0) -> nn.Module:
    """``model`` prepared for QAT (weights ``weight_bits``, activations 8 bits), calibrated on a few training-mode
    batches, fake quantization on, then converted to int8 (a copy; ``model`` keeps its QAT layers)."""
    layers = QuantizationAwareTraining(weight_bits=weight_bits, activation_bits=8).prepare(model)
    assert set(layers) == set(INT8_LAYERS)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(16, 1, 28, 28, generator=generator))
    for layer in layers.values():
        layer.enable_fake_quant()
    return convert_to_int8(model)


def bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().reshape(-1).view(torch.uint8)


def assert_state_bit_equal(actual: nn.Module, expected: nn.Module) -> None:
    got, want = actual.state_dict(), expected.state_dict()
    assert list(got) == list(want)
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype and got[name].shape == tensor.shape, name
        assert torch.equal(bits(got[name]), bits(tensor)), name


def header_size(path: Path) -> int:
    with open(path, "rb") as file:
        return 8 + struct.unpack("<Q", file.read(8))[0]


def contents(path: Path) -> tuple[dict[str, Any], bytes]:
    """(the safetensors header, manifest included, as JSON; the tensor data): a file's content, byte for byte but
    for the order of the two metadata keys, which safetensors writes in no fixed order."""
    data = path.read_bytes()
    size = header_size(path)
    return json.loads(data[8:size]), data[size:]


def read_manifest(path: Path) -> dict[str, Any]:
    with safe_open(path, framework="pt") as file:
        return json.loads(file.metadata()["lightning_compress"])


def rewrite(path: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    """Rewrite the file's manifest as a forger would (re-signed, so only our own checks can catch the edit)."""
    with safe_open(path, framework="pt") as file:
        tensors = {key: file.get_tensor(key) for key in file.keys()}
        manifest = json.loads(file.metadata()["lightning_compress"])
    edit(manifest)
    safetensors.torch.save_file(tensors, path, metadata=encode_metadata(manifest))


@pytest.fixture
def no_state_is_loaded(monkeypatch: pytest.MonkeyPatch) -> list[nn.Module]:
    """Records every ``load_state_dict`` call: a refused file must not reach one."""
    calls: list[nn.Module] = []
    original = nn.Module.load_state_dict

    def spy(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        calls.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(nn.Module, "load_state_dict", spy)
    return calls


BATCH = torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def sparse_models() -> tuple[ImageClassifier, nn.Module]:
    """(the 90 %-pruned float model, its int8 conversion after 8-bit QAT)."""
    float_model = pruned_classifier(0.9)
    reference = pruned_classifier(0.9)  # the same weights; this one gets QAT layers
    return float_model.eval(), qat_int8(reference)


@pytest.fixture
def saved_int8(sparse_models: tuple[ImageClassifier, nn.Module], tmp_path: Path) -> tuple[nn.Module, Path]:
    _, int8 = sparse_models
    path = tmp_path / "int8.safetensors"
    save_compressed(int8, path)
    return int8, path


# ------------------------------------------------------------------------------ the pruned, converted reference CNN


def test_an_int8_model_reloads_without_a_skeleton_and_computes_bit_for_bit_the_same(
    saved_int8: tuple[nn.Module, Path],
) -> None:
    int8, path = saved_int8
    loaded = load_compressed(path)
    assert type(loaded) is ImageClassifier and not loaded.training
    assert loaded.hparams == int8.hparams
    for name, cls in INT8_LAYERS.items():
        layer = loaded.get_submodule(name)
        assert type(layer) is cls and layer.rebuild_args() == int8.get_submodule(name).rebuild_args()
    assert_state_bit_equal(loaded, int8)
    with torch.no_grad():
        expected, actual = int8(BATCH), loaded(BATCH)
    assert torch.equal(bits(actual), bits(expected))


def test_pruned_weights_are_int8_zeros_stored_in_a_bit_mask(
    sparse_models: tuple[ImageClassifier, nn.Module], saved_int8: tuple[nn.Module, Path]
) -> None:
    float_model, _ = sparse_models
    _, path = saved_int8
    manifest = read_manifest(path)
    for name in INT8_LAYERS:
        entry = manifest["tensors"][f"{name}.qweight"]
        assert entry["codec"] == "bitmask" and entry["meta"]["dtype"] == "int8"
    loaded = load_compressed(path)
    for name in INT8_LAYERS:
        pruned = float_model.get_submodule(name).weight == 0
        int8_weight = loaded.get_submodule(name).qweight
        assert int8_weight.dtype == torch.int8
        # The kept weights are the largest 10 %, far above one quantization step, so none of them rounds to zero.
        assert torch.equal(int8_weight == 0, pruned), name
    with safe_open(path, framework="pt") as file:
        values = file.get_tensor("net.fc1.qweight::values")
    assert values.dtype == torch.int8 and values.numel() == int((float_model.net.fc1.weight != 0).sum())


def test_the_int8_file_is_much_smaller_than_the_float_sparse_export(
    sparse_models: tuple[ImageClassifier, nn.Module], tmp_path: Path
) -> None:
    float_model, int8 = sparse_models
    float_bytes = save_compressed(float_model, tmp_path / "float.safetensors")
    int8_bytes = save_compressed(int8, tmp_path / "int8.safetensors")
    torch.save(float_model.state_dict(), tmp_path / "dense.pt")
    dense_bytes = (tmp_path / "dense.pt").stat().st_size
    ratio = int8_bytes / float_bytes
    print(
        f"\n90%-sparse reference CNN: int8 {int8_bytes} B, float sparse {float_bytes} B, dense torch.save"
        f" {dense_bytes} B; int8/float sparse = {ratio:.3f}, int8/dense = {int8_bytes / dense_bytes:.3f}"
    )
    # 1 bit per weight + 1 byte (not 4) per non-zero: (1/8 + 0.1) / (1/8 + 0.4) = 0.43 of the float sparse file.
    assert ratio <= 0.5


def test_the_file_spends_exactly_packed_nbytes_on_int8_tensor_data(saved_int8: tuple[nn.Module, Path]) -> None:
    int8, path = saved_int8
    data = sum(packed_nbytes(tensor) for tensor in int8.state_dict().values())
    assert path.stat().st_size == header_size(path) + data  # the monitor's bytes_compressed is the file's data


def test_the_manifest_records_each_int8_layer_with_its_constructor_arguments(
    saved_int8: tuple[nn.Module, Path], tmp_path: Path
) -> None:
    int8, path = saved_int8
    modules = read_manifest(path)["modules"]
    assert set(modules) == set(INT8_LAYERS)
    for name, cls in INT8_LAYERS.items():
        assert modules[name] == {
            "class_path": f"{cls.__module__}.{cls.__qualname__}",
            "module": cls.__module__,
            "qualname": cls.__qualname__,
            "args": int8.get_submodule(name).rebuild_args(),
        }
    float_path = tmp_path / "float.safetensors"
    save_compressed(pruned_classifier(0.5), float_path)
    assert "modules" not in read_manifest(float_path)  # a float model's manifest is what it was before


class OwnRebuildableLinear(nn.Linear):
    """A user's own layer that answers ``rebuild_args``: the user's model constructor builds it, so it is not
    recorded (only the package's layers are, which no user constructor knows)."""

    def rebuild_args(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features}


def test_the_package_layers_that_are_rebuildable_are_the_recorded_modules(tmp_path: Path) -> None:
    model = nn.Sequential(Int8Linear(4, 4), OwnRebuildableLinear(4, 4), nn.Linear(4, 4), LowRankLinear(4, 4, rank=2))
    assert [isinstance(layer, Rebuildable) for layer in model] == [True, True, False, True]
    save_compressed(model, tmp_path / "mixed.safetensors")
    modules = read_manifest(tmp_path / "mixed.safetensors")["modules"]
    assert {name: record["args"] for name, record in modules.items()} == {
        "0": model[0].rebuild_args(),
        "3": model[3].rebuild_args(),
    }


def test_4_bit_weights_take_about_half_the_bytes_of_8_bit_weights(tmp_path: Path) -> None:
    sizes = {}
    for weight_bits in (8, 4):
        int8 = qat_int8(pruned_classifier(0.0), weight_bits=weight_bits)
        path = tmp_path / f"w{weight_bits}.safetensors"
        sizes[weight_bits] = save_compressed(int8, path)
        codec = read_manifest(path)["tensors"]["net.fc1.qweight"]["codec"]
        assert codec == ("int4" if weight_bits == 4 else "dense")
        loaded = load_compressed(path)
        assert_state_bit_equal(loaded, int8)
        with torch.no_grad():
            assert torch.equal(loaded(BATCH), int8(BATCH))
    ratio = sizes[4] / sizes[8]
    print(f"\ndense reference CNN: 4-bit {sizes[4]} B / 8-bit {sizes[8]} B = {ratio:.3f}")
    assert 0.45 <= ratio <= 0.55


def test_pruned_4_bit_weights_are_a_bit_mask_plus_a_nibble_per_non_zero(tmp_path: Path) -> None:
    int8 = qat_int8(pruned_classifier(0.9), weight_bits=4)
    path = tmp_path / "w4_sparse.safetensors"
    written = save_compressed(int8, path)
    weight = int8.net.fc1.qweight
    assert read_manifest(path)["tensors"]["net.fc1.qweight"]["codec"] == "bitmask_int4"
    assert packed_nbytes(weight) == weight.numel() // 8 + (int(weight.count_nonzero()) + 1) // 2
    print(f"\n90%-sparse reference CNN, 4-bit weights: {written} B")
    loaded = load_compressed(path)
    with torch.no_grad():
        assert torch.equal(loaded(BATCH), int8(BATCH))


def test_a_skeleton_that_already_has_the_int8_layers_keeps_them(saved_int8: tuple[nn.Module, Path]) -> None:
    int8, path = saved_int8
    skeleton = qat_int8(pruned_classifier(0.9, seed=5), seed=5)  # same structure, other weights
    layers = {name: skeleton.get_submodule(name) for name in INT8_LAYERS}
    assert load_compressed(path, skeleton) is skeleton
    assert all(skeleton.get_submodule(name) is layer for name, layer in layers.items())
    assert_state_bit_equal(skeleton, int8)


def test_an_int8_export_loads_into_a_fresh_float_instance_of_the_users_class(
    saved_int8: tuple[nn.Module, Path],
) -> None:
    """The recorded int8 layers are built and put in place of the skeleton's float layers, then the state dict is
    loaded strictly: the user needs nothing but their model class."""
    int8, path = saved_int8
    skeleton = ImageClassifier(image_size=28)
    assert load_compressed(path, skeleton) is skeleton and not skeleton.training
    for name, cls in INT8_LAYERS.items():
        assert type(skeleton.get_submodule(name)) is cls
    assert_state_bit_equal(skeleton, int8)
    with torch.no_grad():
        assert torch.equal(bits(skeleton(BATCH)), bits(int8(BATCH)))


class MyModel(nn.Module):
    """A user's own class: a plain nn.Module, no ``save_hyperparameters``, so the file alone cannot rebuild it."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv1d(8, 8, 3, padding=1))
        self.head = nn.Linear(8 * 16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.features[1](self.features[0](x)).flatten(2)  # (N, 8, 16): a sequence for the Conv1d
        return self.head(self.features[2](hidden).flatten(1))


@pytest.mark.parametrize("activation_bits", [8, None], ids=["int8_activations", "weight_only"])
def test_an_int8_export_of_a_plain_module_loads_into_its_fresh_class(
    tmp_path: Path, activation_bits: int | None
) -> None:
    torch.manual_seed(0)
    model = MyModel()
    x = torch.randn(16, 1, 4, 4)
    layers = QuantizationAwareTraining(weight_bits=8, activation_bits=activation_bits).prepare(model)
    model.train()
    with torch.no_grad():
        model(x)
    for layer in layers.values():
        layer.enable_fake_quant()
    int8 = convert_to_int8(model)
    save_compressed(int8, tmp_path / "mine.safetensors")
    with pytest.raises(CompressedFileError, match=r"cannot rebuild .*MyModel without a skeleton"):
        load_compressed(tmp_path / "mine.safetensors")
    loaded = load_compressed(tmp_path / "mine.safetensors", model=MyModel())
    assert [type(loaded.features[0]), type(loaded.features[2]), type(loaded.head)] == [
        Int8Conv2d, Int8Conv1d, Int8Linear
    ]  # fmt: skip
    assert_state_bit_equal(loaded, int8)
    with torch.no_grad():
        assert torch.equal(bits(loaded(x)), bits(int8(x)))


def _without_fc1(model: ImageClassifier) -> ImageClassifier:
    del model.net.fc1
    return model


def _identity_fc1(model: ImageClassifier) -> ImageClassifier:
    model.net.fc1 = nn.Identity()
    return model


@pytest.mark.parametrize(
    ("skeleton", "match"),
    [
        (
            lambda: ImageClassifier(image_size=8),  # fc1 takes 64 * 2 * 2 inputs: every tensor is recorded, so only
            r"records module 'net.fc1' \(.*Int8Linear\) for a \[128, 3136\] weight, but the given ImageClassifier's"
            r" Linear there has a \[128, 256\] weight; nothing was loaded",  # the layer's shape can tell
        ),
        (
            lambda: ImageClassifier(num_classes=5),
            r"records module 'net.fc2' \(.*Int8Linear\) for a \[10, 128\] weight, but the given ImageClassifier's"
            r" Linear there has a \[5, 128\] weight",
        ),
        (
            lambda: _without_fc1(ImageClassifier()),
            r"records module 'net.fc1' \(.*Int8Linear\), which the given ImageClassifier does not have",
        ),
        (
            lambda: _identity_fc1(ImageClassifier()),
            r"records module 'net.fc1' \(.*Int8Linear\) in place of the given ImageClassifier's Identity, which holds"
            r" no weight",
        ),
    ],
    ids=["other_input_size", "other_class_count", "layer_missing", "not_a_layer"],
)
def test_a_float_skeleton_that_does_not_fit_is_refused_naming_the_layer_and_left_as_it_was(
    saved_int8: tuple[nn.Module, Path],
    no_state_is_loaded: list[nn.Module],
    skeleton: Callable[[], nn.Module],
    match: str,
) -> None:
    _, path = saved_int8
    model = skeleton()
    modules = dict(model.named_modules())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CompressedFileError, match=rf"^{path}: {match}"):
        load_compressed(path, model)
    assert dict(model.named_modules()) == modules  # no layer was put in place
    assert list(model.state_dict()) == list(before)
    assert all(torch.equal(bits(before[k]), bits(v)) for k, v in model.state_dict().items())
    assert no_state_is_loaded == []


def test_a_file_without_module_records_still_loads_into_a_skeleton(saved_int8: tuple[nn.Module, Path]) -> None:
    int8, path = saved_int8
    rewrite(path, lambda m: m.pop("modules"))  # as written before module records existed
    skeleton = qat_int8(pruned_classifier(0.9, seed=5), seed=5)
    assert_state_bit_equal(load_compressed(path, skeleton), int8)
    with pytest.raises(CompressedFileError, match=rf"{path}: does not fit ImageClassifier \(nothing was loaded\)"):
        load_compressed(path)  # rebuilt with float layers: the file's int8 weights do not fit


class SequentialNet(LightningModule):
    """Int8 layers inside nn.Sequential / nn.ModuleList: their names have numeric parts (``body.0``)."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.body = nn.Sequential(nn.Linear(width, 32), nn.ReLU(), nn.Linear(32, 32))
        self.heads = nn.ModuleList([nn.Linear(32, 4), nn.Linear(32, 2)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.body(x)
        return torch.cat([head(hidden) for head in self.heads], dim=1)


def test_int8_layers_inside_sequential_and_module_lists_are_rebuilt(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = SequentialNet(width=16)
    layers = QuantizationAwareTraining(weight_bits=8, activation_bits=8).prepare(model)
    model.train()
    with torch.no_grad():
        model(torch.randn(32, 16))
    for layer in layers.values():
        layer.enable_fake_quant()
    int8 = convert_to_int8(model)
    path = tmp_path / "sequential.safetensors"
    save_compressed(int8, path)
    assert set(read_manifest(path)["modules"]) == {"body.0", "body.2", "heads.0", "heads.1"}
    loaded = load_compressed(path, trusted_prefixes=[SequentialNet.__module__])
    assert type(loaded.heads[1]) is Int8Linear
    assert_state_bit_equal(loaded, int8)
    x = torch.randn(8, 16)
    with torch.no_grad():
        assert torch.equal(loaded(x), int8(x))


# ------------------------------------------------------------------------------- a QAT-trained model, as trained


class LinearHeavy(LightningModule):
    """An MLP on the 8x8 digits: nearly all of its bytes are Linear weights."""

    def __init__(self, width: int = 256) -> None:
        super().__init__()
        self.save_hyperparameters()
        layers = [nn.Flatten(), nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU()]
        self.net = nn.Sequential(*layers, nn.Linear(width, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        images, labels = batch
        return nn.functional.cross_entropy(self(images), labels)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3)


@pytest.fixture
def qat_trained(quiet_trainer_kwargs: dict[str, Any]) -> LinearHeavy:
    """LinearHeavy after 12 steps of QuantizationAwareTraining (8-bit weights and activations from step 4)."""
    pl.seed_everything(0)
    model = LinearHeavy()
    callback = QuantizationAwareTraining(weight_bits=8, activation_bits=8, start_step=4, convert_at_fit_end=False)
    pl.Trainer(max_steps=12, callbacks=[callback], **quiet_trainer_kwargs).fit(model, datamodule=DigitsDataModule())
    assert [type(layer) for layer in model.net if isinstance(layer, QATLinear)] == [QATLinear] * 3
    return model


def test_save_compressed_of_a_qat_model_writes_the_file_of_its_int8_conversion(
    qat_trained: LinearHeavy, tmp_path: Path
) -> None:
    """The same file, byte for byte, as ``save_compressed(convert_to_int8(model))``; it loads as the int8 model; and
    the trained model is left as it was (its layers, their tensors, its training mode)."""
    model = qat_trained.train()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    layers = list(model.modules())
    save_compressed(model, tmp_path / "as_trained.safetensors")
    int8 = convert_to_int8(model)
    save_compressed(int8, tmp_path / "converted.safetensors")
    assert contents(tmp_path / "as_trained.safetensors") == contents(tmp_path / "converted.safetensors")

    assert list(model.modules()) == layers and model.training
    assert {name: bits(t) for name, t in model.state_dict().items()}.keys() == before.keys()
    assert all(torch.equal(bits(model.state_dict()[name]), bits(t)) for name, t in before.items())

    loaded = load_compressed(tmp_path / "as_trained.safetensors", trusted_prefixes=[LinearHeavy.__module__])
    assert [type(loaded.net[i]) for i in (1, 3, 5)] == [Int8Linear] * 3
    assert_state_bit_equal(loaded, int8)
    images = torch.randn(32, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(loaded(images), int8(images))


def test_the_file_of_a_qat_model_is_under_0_3x_of_dense_and_its_bytes_are_what_the_monitor_reports(
    qat_trained: LinearHeavy, tmp_path: Path
) -> None:
    model = qat_trained
    path = tmp_path / "as_trained.safetensors"
    save_compressed(model, path)
    torch.save(LinearHeavy().state_dict(), tmp_path / "dense.pt")
    ratio = path.stat().st_size / (tmp_path / "dense.pt").stat().st_size
    print(f"\nQAT-trained LinearHeavy: save_compressed / dense torch.save = {ratio:.3f}")
    assert ratio <= 0.3

    # compress/bytes_compressed (monitor.measure.measure_model): each QAT layer's storage(), plus every other tensor
    qat_layers = [module for module in model.modules() if isinstance(module, QATLinear)]
    inside = {id(t) for layer in qat_layers for t in (*layer.parameters(), *layer.buffers())}
    others = [t for t in (*model.parameters(), *model.buffers()) if id(t) not in inside]
    expected = sum(layer.storage().bytes_compressed for layer in qat_layers) + sum(packed_nbytes(t) for t in others)
    file_data = path.stat().st_size - header_size(path)
    assert file_data == expected == measure_model(model).bytes_compressed


def test_a_qat_layer_that_does_not_quantize_yet_is_written_as_it_is(tmp_path: Path) -> None:
    """Before ``start_step`` a QAT layer computes in float: the file holds its float weight and observer state (as
    the monitor counts it), and loads into a QAT skeleton."""
    model = nn.Sequential(nn.Linear(16, 8))
    QuantizationAwareTraining(weight_bits=8, activation_bits=8).prepare(model)
    model(torch.randn(4, 16))
    save_compressed(model, tmp_path / "observing.safetensors")
    manifest = read_manifest(tmp_path / "observing.safetensors")
    assert "modules" not in manifest and manifest["tensors"]["0.weight"]["meta"]["dtype"] == "float32"
    skeleton = nn.Sequential(nn.Linear(16, 8))
    QuantizationAwareTraining(weight_bits=8, activation_bits=8).prepare(skeleton)
    assert_state_bit_equal(load_compressed(tmp_path / "observing.safetensors", skeleton), model)


# ------------------------------------------------------------------------------------ forged or damaged records


def _set(name: str, **changes: Any) -> Callable[[dict[str, Any]], None]:
    return lambda m: m["modules"][name].update(changes)


def _rename(old: str, new: str) -> Callable[[dict[str, Any]], None]:
    return lambda m: m["modules"].__setitem__(new, m["modules"].pop(old))


def _args(name: str, **changes: Any) -> Callable[[dict[str, Any]], None]:
    return lambda m: m["modules"][name]["args"].update(changes)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (_rename("net.fc1", "net.fc9"), r"records module 'net.fc9' .*which the rebuilt ImageClassifier does not have"),
        (_rename("net.fc1", "net.relu.fc1"), r"records module 'net.relu.fc1' .*does not have"),
        (_rename("net.fc1", "hparams"), r"records module 'hparams' .*does not have"),
        (_rename("net.fc1", "net..fc1"), r"module record name 'net..fc1' is not a dotted attribute path"),
        (_rename("net.fc1", "net.fc1 "), r"module record name 'net.fc1 ' is not a dotted attribute path"),
        (_args("net.fc1", in_features="many"), r"could not rebuild module 'net.fc1' as .*Int8Linear\(\*\*"),
        (_args("net.conv1", stride_x=[1, 1]), r"could not rebuild module 'net.conv1' as .*unexpected keyword"),
        (
            _args("net.fc1", in_features=7),
            r"records module 'net.fc1' \(.*Int8Linear\) for a \[128, 7\] weight, but the rebuilt ImageClassifier's"
            r" Linear there has a \[128, 3136\] weight",
        ),
        (_set("net.fc1", args=None), r"cannot rebuild module 'net.fc1' \(.*Int8Linear\) without a skeleton"),
        (_set("net.fc1", qualname="Int8 Linear"), r"recorded class .*'Int8 Linear' for module 'net.fc1' is not a"),
        (_set("net.fc1", qualname="Int8Nothing"), r"Int8Nothing for module 'net.fc1', which cannot be imported"),
        (_set("net.fc1", qualname="QuantSpec"), r"QuantSpec for module 'net.fc1', which is not a torch.nn.Module"),
        (lambda m: m["modules"].__setitem__("net.fc1", [1, 2]), r"its record for module 'net.fc1' is not a JSON"),
        (lambda m: m.__setitem__("modules", ["net.fc1"]), r"its manifest `modules` is not a JSON object"),
        (
            lambda m: m["modules"].pop("net.fc1"),
            r"does not fit ImageClassifier .*the file has 4 tensor\(s\) the model lacks: 'net.fc1.input_scale',"
            r" 'net.fc1.input_zero_point', 'net.fc1.qweight', 'net.fc1.weight_scale'",
        ),
    ],
    ids=[
        "unknown_name",
        "name_under_a_leaf",
        "name_of_a_non_module",
        "bad_name",
        "name_with_space",
        "bad_arg_value",
        "unknown_arg",
        "args_of_another_shape",
        "args_null",
        "class_not_dotted",
        "class_missing",
        "class_not_a_module",
        "record_not_object",
        "modules_not_object",
        "record_dropped",
    ],
)
def test_a_forged_module_record_is_a_clear_error_and_nothing_is_loaded(
    saved_int8: tuple[nn.Module, Path],
    no_state_is_loaded: list[nn.Module],
    edit: Callable[[dict[str, Any]], None],
    match: str,
) -> None:
    _, path = saved_int8
    if "QuantSpec" in match:  # a trusted, importable class that is not a module
        rewrite(path, _set("net.fc1", module="lightning_compress.quantization.fake_quant"))
    rewrite(path, edit)
    with pytest.raises(CompressedFileError, match=rf"^{path}: .*{match}"):
        load_compressed(path)
    assert no_state_is_loaded == []


def test_a_flipped_byte_in_a_module_record_is_reported(
    saved_int8: tuple[nn.Module, Path], no_state_is_loaded: list[nn.Module]
) -> None:
    _, path = saved_int8
    data = bytearray(path.read_bytes())
    at = data.index(b'in_features\\":3136') + len(b'in_features\\":')  # the manifest is a JSON string in the header
    data[at] = ord("4")  # 3136 -> 4136, the manifest's checksum left as it was
    path.write_bytes(bytes(data))
    with pytest.raises(CompressedFileError, match=rf"{path}: is corrupted: its manifest does not match its SHA-256"):
        load_compressed(path)
    assert no_state_is_loaded == []


def test_an_untrusted_class_in_a_module_record_is_never_imported(
    saved_int8: tuple[nn.Module, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    no_state_is_loaded: list[nn.Module],
) -> None:
    int8, path = saved_int8
    marker = tmp_path / "imported.txt"
    module = f"lc_untrusted_layer_{uuid.uuid4().hex[:8]}"
    site = tmp_path / "site"
    site.mkdir()
    (site / f"{module}.py").write_text(
        "from pathlib import Path\n"
        f"Path({os.fspath(marker)!r}).write_text('imported')\n"
        "from lightning_compress.quantization import Int8Linear\n\n"
        "class Layer(Int8Linear):\n"
        "    pass\n"
    )
    monkeypatch.syspath_prepend(os.fspath(site))
    rewrite(path, _set("net.fc1", module=module, qualname="Layer", class_path=f"{module}.Layer"))

    for trusted in ([], ["lc_untrusted_layer"], [f"{module}_other"]):
        with pytest.raises(
            CompressedFileError,
            match=rf"^{path}: records the class {module}\.Layer for module 'net.fc1', which is outside the trusted"
            rf" prefixes .*nothing was imported.*trusted_prefixes=\['{module}'\]",
        ):
            load_compressed(path, trusted_prefixes=trusted)
        assert not marker.exists() and module not in sys.modules
    assert no_state_is_loaded == []

    loaded = load_compressed(path, trusted_prefixes=[module])
    assert marker.exists() and type(loaded.net.fc1).__name__ == "Layer"
    assert_state_bit_equal(loaded, int8)
    monkeypatch.delitem(sys.modules, module)


# ------------------------------------------------------------------------------------------------- int8 codecs


EDGE_INT8 = torch.tensor([-128, 127, 0, -1, 1, 0, 0, -128, 0, 127, 0], dtype=torch.int8)
ALL_INT4 = torch.arange(-8, 8, dtype=torch.int8)


@pytest.mark.parametrize(
    "tensor",
    [
        EDGE_INT8,
        EDGE_INT8.view(11, 1).expand(11, 3).t(),  # not contiguous
        torch.zeros(0, dtype=torch.int8),
        torch.zeros(4, 4, dtype=torch.int8),
        torch.tensor(-128, dtype=torch.int8),
        torch.tensor([0, 255, 0, 0, 1, 128], dtype=torch.uint8),
    ],
    ids=["edges", "non_contiguous", "empty", "all_zero", "scalar", "uint8"],
)
def test_bitmask_stores_int8_and_uint8_exactly_at_a_bit_per_element_plus_a_byte_per_non_zero(
    tensor: torch.Tensor,
) -> None:
    parts, entry = pack(tensor, "bitmask")
    assert parts["values"].dtype == tensor.dtype
    expected_bytes = -(-tensor.numel() // 8) + int(tensor.count_nonzero())
    assert packed_nbytes(tensor, "bitmask") == sum(p.numel() for p in parts.values()) == expected_bytes
    restored = unpack(parts, entry)
    assert restored.dtype == tensor.dtype and restored.shape == tensor.shape and torch.equal(restored, tensor)


@pytest.mark.parametrize("codec", ["int4", "bitmask_int4"])
@pytest.mark.parametrize(
    "tensor",
    [
        ALL_INT4,
        ALL_INT4[:15],  # odd count: the last byte has one nibble
        ALL_INT4.view(4, 4).t(),  # not contiguous
        torch.tensor([-8, 0, 0, 7, 0, 0, 0, 0, 0, -8, 7], dtype=torch.int8),
        torch.zeros(0, dtype=torch.int8),
        torch.zeros(3, 0, dtype=torch.int8),
        torch.zeros(5, 3, dtype=torch.int8),
        torch.tensor(7, dtype=torch.int8),
        torch.tensor(-8, dtype=torch.int8),
    ],
    ids=["all_values", "odd", "non_contiguous", "sparse_edges", "empty", "empty_2d", "all_zero", "scalar7", "scalar-8"],
)
def test_the_4_bit_codecs_round_trip_every_value_from_minus_8_to_7_exactly(codec: str, tensor: torch.Tensor) -> None:
    assert CODECS[codec].lossless and CODECS[codec].supports(tensor)
    parts, entry = pack(tensor, codec)
    json.dumps(entry)
    assert all(part.dtype == torch.uint8 for part in parts.values())
    numel, nnz = tensor.numel(), int(tensor.count_nonzero())
    expected_bytes = -(-numel // 2) if codec == "int4" else -(-numel // 8) + -(-nnz // 2)
    assert packed_nbytes(tensor, codec) == sum(p.numel() for p in parts.values()) == expected_bytes
    restored = unpack(parts, entry)
    assert restored.dtype == torch.int8 and restored.shape == tensor.shape and torch.equal(restored, tensor)


def test_int4_nibbles_are_twos_complement_first_element_high() -> None:
    parts, _ = pack(torch.tensor([-8, 7, -1, 1, 5], dtype=torch.int8), "int4")
    assert parts["nibbles"].tolist() == [0x87, 0xF1, 0x50]
    parts, _ = pack(torch.tensor([0, -8, 0, 0, 0, 0, 0, 0, 0, 7, -1], dtype=torch.int8), "bitmask_int4")
    assert parts["bitmask"].tolist() == [0b01000000, 0b01100000] and parts["nibbles"].tolist() == [0x87, 0xF0]


@pytest.mark.parametrize(
    "tensor",
    [
        torch.tensor([0, 8], dtype=torch.int8),
        torch.tensor([-9, 0], dtype=torch.int8),
        torch.tensor([127, -128], dtype=torch.int8),
        torch.tensor([0, 1], dtype=torch.uint8),
        torch.tensor([0, 1], dtype=torch.int16),
        torch.tensor([0.0, 1.0]),
    ],
    ids=["8", "-9", "int8_edges", "uint8", "int16", "float"],
)
def test_the_4_bit_codecs_refuse_what_they_cannot_store_exactly(tensor: torch.Tensor) -> None:
    for codec in ("int4", "bitmask_int4"):
        assert not CODECS[codec].supports(tensor)
        with pytest.raises(PackingError, match=rf"codec '{codec}' cannot store this .* values all lie in \[-8, 7\]"):
            pack(tensor, codec)


def test_damaged_4_bit_parts_are_refused() -> None:
    parts, entry = pack(torch.tensor([1, 2, 3], dtype=torch.int8), "int4")
    with pytest.raises(PackingError, match="part `nibbles` has a non-zero nibble past the last element"):
        unpack({"nibbles": parts["nibbles"] | 1}, entry)
    with pytest.raises(PackingError, match=r"part `nibbles` is uint8\[1\], expected uint8\[2\]"):
        unpack({"nibbles": parts["nibbles"][:1]}, entry)
    with pytest.raises(PackingError, match="codec 'int4' stores int8 tensors only, the metadata says float32"):
        unpack(parts, {**entry, "meta": {**entry["meta"], "dtype": "float32"}})
    parts, entry = pack(torch.tensor([0, 3, 0, -2], dtype=torch.int8), "bitmask_int4")
    with pytest.raises(PackingError, match="part `nibbles` holds a zero where the bit mask marks a non-zero"):
        unpack({**parts, "nibbles": torch.tensor([0x30], dtype=torch.uint8)}, entry)
    with pytest.raises(PackingError, match="part `bitmask` has bits set past the last element"):
        unpack({**parts, "bitmask": parts["bitmask"] | 1}, entry)


@pytest.mark.parametrize(
    ("tensor", "codec"),
    [
        (torch.randint(-128, 128, (64, 64), generator=torch.Generator().manual_seed(0), dtype=torch.int8), "dense"),
        (torch.tensor([-128, 127] + [0] * 62, dtype=torch.int8), "bitmask"),
        (ALL_INT4.repeat(4), "int4"),
        (torch.tensor([-8, 7] + [0] * 62, dtype=torch.int8), "bitmask_int4"),
        (torch.tensor([255] + [0] * 63, dtype=torch.uint8), "bitmask"),
        (torch.tensor([7] + [0] * 63, dtype=torch.uint8), "bitmask"),  # nibbles are for signed int8 only
        (torch.tensor([7] + [0] * 63, dtype=torch.int16), "dense"),  # wider integers stay dense
        (torch.tensor([True] + [False] * 63), "dense"),
        (torch.tensor([3], dtype=torch.int8), "dense"),  # 1 byte either way: ties keep dense
    ],
    ids=["int8_dense", "int8_sparse", "int4_dense", "int4_sparse", "uint8", "uint8_small", "int16", "bool", "tie"],
)
def test_choose_codec_picks_the_smallest_codec_for_int8_tensors(tensor: torch.Tensor, codec: str) -> None:
    assert choose_codec(tensor) == codec
    sizes = [c.nbytes(tensor) for c in CODECS.values() if c.lossless and c.supports(tensor)]
    if tensor.dtype in (torch.int8, torch.uint8):
        assert packed_nbytes(tensor) == min(sizes)
    parts, entry = pack(tensor)
    assert entry["codec"] == codec and torch.equal(unpack(parts, entry), tensor)
