"""QAT and int8 for transformers' ``Conv1D`` (GPT-2's attention and MLP: ``y = x @ W + b``, ``W`` stored ``(in, out)``).

What the tests pin down:
- ``QATConv1D`` shares the Conv1D's ``weight``/``bias`` Parameters (still ``(in, out)``), keeps ``nf``/``nx``,
  observes the weight per output feature (axis 1 of the stored weight) or per group of inputs, computes exactly
  what the Conv1D computes until fake quantization starts, and describes itself as an ``(out, in)`` layer;
- ``Int8Conv1D`` computes what the QAT layer computes in eval, with ``weight`` the float ``(in, out)`` weight;
- on a tiny GPT-2 a ``QuantizationAwareTraining`` fit swaps all 8 Conv1D layers (not the tied ``lm_head``), keeps
  every Parameter object, and its int8 model matches the QAT model, exports, reloads (with and without a skeleton)
  and deep-copies with identical logits; with 2:4 pruning the int8 integers keep the pattern.
"""

from __future__ import annotations

import copy
import json
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from transformers.pytorch_utils import Conv1D  # noqa: E402

from lightning_compress import (  # noqa: E402
    GradualPruning,
    QuantizationAwareTraining,
    convert_to_int8,
    load_compressed,
    save_compressed,
)
from lightning_compress._lightning import pl  # noqa: E402
from lightning_compress.protocol import dense_weight_shape, describe  # noqa: E402
from lightning_compress.quantization import Int8Conv1D, QATConv1D, QATConv1d, QATLinear, QuantSpec  # noqa: E402

ACTIVATIONS = QuantSpec(bits=8, symmetric=False, per_channel=False)
QUIET: dict[str, Any] = {"accelerator": "cpu", "devices": 1, "logger": False, "enable_checkpointing": False,
                         "enable_progress_bar": False, "enable_model_summary": False}  # fmt: skip
CONV1D_NAMES = [f"model.transformer.h.{i}.{name}" for i in range(2)
                for name in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]  # fmt: skip


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected|: the issue's measure."""
    return float((actual - expected).abs().max() / expected.abs().max())


def calibrated(layer: QATConv1D, x: torch.Tensor) -> QATConv1D:
    """``layer`` after observing ``x`` in training mode, fake quantization on, in eval mode."""
    layer.train()
    with torch.no_grad():
        layer(x)
    if layer.learnable_scales:
        with torch.no_grad():
            for param, value in layer.scales_from_observers():
                param.copy_(value)
    layer.enable_fake_quant()
    return layer.eval()


# ------------------------------------------------------------------------------------------------ the layers


def test_the_qat_layer_shares_the_conv1ds_parameters_and_computes_exactly_what_it_computes_before_quantizing() -> None:
    torch.manual_seed(0)
    conv = Conv1D(20, 12)
    nn.init.normal_(conv.bias)
    layer = QATConv1D.from_conv1d(conv, activation_spec=ACTIVATIONS)
    assert layer.weight is conv.weight and layer.bias is conv.bias and layer.weight.shape == (12, 20)
    assert (layer.nf, layer.nx, layer.in_features, layer.out_features) == (20, 12, 12, 20)
    assert [p for p in layer.parameters()] == [conv.weight, conv.bias]
    x = torch.randn(3, 5, 12)
    assert torch.equal(layer.train()(x), conv(x))
    back = layer.to_conv1d()
    assert type(back) is Conv1D and back.weight is conv.weight and back.bias is conv.bias and back.nf == 20


def test_the_weight_is_observed_per_output_feature_that_is_axis_1_of_the_stored_weight() -> None:
    torch.manual_seed(0)
    conv = Conv1D(20, 12)
    layer = calibrated(QATConv1D.from_conv1d(conv), torch.randn(4, 12))
    weight = conv.weight.detach()
    assert torch.equal(layer.weight_observer.min_val, weight.amin(dim=0))
    assert torch.equal(layer.weight_observer.max_val, weight.amax(dim=0))
    scale, _ = layer.weight_qparams()
    assert scale.shape == (20,)
    fake = layer.quantized_weight()
    assert fake.shape == (12, 20)
    assert torch.allclose(fake / scale, torch.round(fake / scale), atol=1e-4)  # each column on its own grid
    assert not torch.equal(fake, weight)


def test_the_qat_layer_describes_itself_as_an_out_in_layer_and_counts_the_bytes_of_its_int8_form() -> None:
    torch.manual_seed(0)
    layer = calibrated(QATConv1D.from_conv1d(Conv1D(20, 12), activation_spec=ACTIVATIONS), torch.randn(8, 12))
    assert dense_weight_shape(layer) == (20, 12)
    figures = describe(layer)
    assert figures.weight_shape == (20, 12) and figures.params_dense == 240 and figures.bits == 8
    int8 = layer.to_int8()
    assert layer.storage() == int8.storage()
    assert layer.storage().bytes_compressed < layer.storage().bytes_dense / 3


@pytest.mark.parametrize("activations", [ACTIVATIONS, None], ids=["int8-activations", "weight-only"])
def test_the_int8_layer_computes_what_the_qat_layer_computes_in_eval_with_an_in_out_float_weight(
    activations: QuantSpec | None,
) -> None:
    torch.manual_seed(0)
    conv = Conv1D(20, 12)
    nn.init.normal_(conv.bias)
    x = torch.randn(6, 7, 12)
    layer = calibrated(QATConv1D.from_conv1d(conv, activation_spec=activations), x)
    int8 = layer.to_int8()
    assert type(int8) is Int8Conv1D and (int8.nf, int8.nx) == (20, 12)
    assert int8.qweight.dtype == torch.int8 and int8.qweight.shape == (20, 12)  # integers (out, in), internally
    assert int8.weight.shape == (12, 20) and int8.weight.dtype == torch.float32
    assert torch.allclose(int8.weight, layer.quantized_weight().detach(), atol=1e-6)
    assert int8.dense_weight_shape() == (20, 12) and int8.compression_figures().weight_shape == (20, 12)
    assert repr(int8).startswith("Int8Conv1D(nf=20, nx=12, ")
    with torch.no_grad():
        expected, actual = layer(x), int8(x)
    assert actual.shape == (6, 7, 20)
    assert relative_error(actual, expected) <= 1e-5


def test_the_int8_layer_rebuilds_from_json_args_and_deep_copies_and_pickles_after_a_forward() -> None:
    torch.manual_seed(0)
    x = torch.randn(6, 12)
    int8 = calibrated(QATConv1D.from_conv1d(Conv1D(20, 12), activation_spec=ACTIVATIONS), x).to_int8()
    expected = int8(x)  # packs oneDNN's weight: an opaque tensor that cannot be copied
    args = json.loads(json.dumps(int8.rebuild_args()))
    empty = Int8Conv1D(**args)
    assert {k: (v.shape, v.dtype) for k, v in empty.state_dict().items()} == {
        k: (v.shape, v.dtype) for k, v in int8.state_dict().items()
    }
    empty.load_state_dict(int8.state_dict())
    for clone in (empty, copy.deepcopy(int8), pickle.loads(pickle.dumps(int8))):
        assert torch.equal(clone(x), expected)


def test_group_size_gives_one_scale_per_group_of_consecutive_inputs_of_each_output_feature() -> None:
    torch.manual_seed(0)
    conv = Conv1D(6, 8)
    x = torch.randn(10, 8)
    layer = calibrated(QATConv1D.from_conv1d(conv, group_size=4, activation_spec=ACTIVATIONS), x)
    weight = conv.weight.detach().t()  # (out, in)
    groups = weight.reshape(6, 2, 4)
    assert torch.equal(layer.weight_observer.max_val, groups.amax(dim=-1).reshape(-1))
    int8 = layer.to_int8()
    assert int8.group_size == 4 and int8.weight_scale.shape == (12,)
    with torch.no_grad():
        assert relative_error(int8(x), layer(x)) <= 1e-5
    with pytest.raises(ValueError, match=r"`group_size`=3 does not divide the layer's 8 input features.*HINT"):
        QATConv1D.from_conv1d(conv, group_size=3)


def test_learnable_scales_learn_and_the_int8_layer_uses_them() -> None:
    torch.manual_seed(0)
    conv = Conv1D(6, 8)
    x = torch.randn(10, 8)
    layer = calibrated(QATConv1D.from_conv1d(conv, activation_spec=ACTIVATIONS, learnable_scales=True), x)
    layer.train()(x).square().sum().backward()
    assert layer.weight_scale.grad is not None and bool(layer.weight_scale.grad.abs().sum() > 0)
    assert layer.input_scale.grad is not None and conv.weight.grad.shape == (8, 6)
    with torch.no_grad():
        layer.weight_scale.mul_(1.5)
    layer.eval()
    int8 = layer.to_int8()
    assert torch.allclose(int8.weight_scale, layer.weight_scale.detach())
    with torch.no_grad():
        assert relative_error(int8(x), layer(x)) <= 1e-5


def test_from_conv1d_refuses_a_layer_that_is_not_a_transformers_conv1d() -> None:
    with pytest.raises(TypeError, match=r"`conv1d` must be a transformers.pytorch_utils.Conv1D, got Linear.*HINT"):
        QATConv1D.from_conv1d(nn.Linear(4, 4))
    with pytest.raises(TypeError, match=r"`from_linear` takes an nn.Linear, got Conv1D"):
        QATLinear.from_linear(Conv1D(4, 4))


def test_torchs_conv1d_and_transformers_conv1d_each_build_their_own_qat_layer() -> None:
    """``QATConv1d.from_conv1d`` (torch's ``nn.Conv1d``) once built through QATConv2d and refused every Conv1d."""
    assert type(QATConv1d.from_conv1d(nn.Conv1d(2, 4, 3))) is QATConv1d
    assert type(QATConv1D.from_conv1d(Conv1D(4, 2))) is QATConv1D


# ------------------------------------------------------------------------------------------------ GPT-2


def gpt2(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=16,
                                     bos_token_id=0, eos_token_id=0)  # fmt: skip
    return transformers.GPT2LMHeadModel(config)


class GPT2Module(pl.LightningModule):
    """A tiny random GPT-2 language model; ``save_hyperparameters`` lets ``load_compressed`` rebuild it."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = gpt2(seed)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        (ids,) = batch
        return self.model(input_ids=ids, labels=ids).loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3)

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        ids = torch.randint(0, 64, (16, 16), generator=torch.Generator().manual_seed(3))
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids), batch_size=4)


IDS = torch.randint(0, 64, (8, 16), generator=torch.Generator().manual_seed(7))


def logits(module: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return module.model(input_ids=IDS).logits


def fit(module: GPT2Module, callbacks: list[Any], root: Path, steps: int = 6) -> None:
    pl.Trainer(max_steps=steps, callbacks=callbacks, default_root_dir=root, **QUIET).fit(module)


@pytest.fixture(scope="module")
def qat_gpt2(tmp_path_factory: pytest.TempPathFactory) -> tuple[GPT2Module, list[nn.Parameter], list[nn.Module]]:
    """(GPT-2 after a QAT fit with 8-bit activations, its Parameters before the fit, the modules swapped out)."""
    module = GPT2Module()
    params = list(module.parameters())
    replaced = [module.get_submodule(name) for name in CONV1D_NAMES]
    callback = QuantizationAwareTraining(activation_bits=8, start_step=2, convert_at_fit_end=False)
    fit(module, [callback], tmp_path_factory.mktemp("qat"))
    assert sorted(callback.layers) == sorted(CONV1D_NAMES)
    return module, params, replaced


def test_qat_on_gpt2_swaps_all_eight_conv1d_layers_keeps_every_parameter_and_leaves_the_tied_head(
    qat_gpt2: tuple[GPT2Module, list[nn.Parameter], list[nn.Module]],
) -> None:
    module, params, replaced = qat_gpt2
    assert [type(module.get_submodule(name)) for name in CONV1D_NAMES] == [QATConv1D] * 8
    assert not any(isinstance(m, Conv1D) for m in module.modules())
    head = module.model.lm_head
    assert type(head) is nn.Linear and head.weight is module.model.transformer.wte.weight
    assert all(a is b for a, b in zip(module.parameters(), params, strict=True))
    for name, old in zip(CONV1D_NAMES, replaced, strict=True):
        layer = module.get_submodule(name)
        assert layer.weight is old.weight and layer.bias is old.bias and layer.weight.shape == (old.nx, old.nf)
        assert bool(layer.fake_quant_enabled) and layer.input_observer is not None
    assert bool(torch.isfinite(logits(module.eval())).all())


def test_the_int8_gpt2_matches_the_qat_gpt2_in_eval(
    qat_gpt2: tuple[GPT2Module, list[nn.Parameter], list[nn.Module]],
) -> None:
    module = qat_gpt2[0].eval()
    int8 = convert_to_int8(module)
    assert [type(int8.get_submodule(name)) for name in CONV1D_NAMES] == [Int8Conv1D] * 8
    expected, actual = logits(module), logits(int8)
    assert relative_error(actual, expected) <= 1e-2
    assert float((actual.argmax(-1) == expected.argmax(-1)).float().mean()) >= 0.99


def test_the_int8_gpt2_reloads_with_identical_logits_without_a_skeleton_and_into_a_fresh_float_one(
    qat_gpt2: tuple[GPT2Module, list[nn.Parameter], list[nn.Module]], tmp_path: Path
) -> None:
    int8 = convert_to_int8(qat_gpt2[0])
    path = tmp_path / "gpt2.safetensors"
    save_compressed(int8, path)
    expected = logits(int8)
    rebuilt = load_compressed(path, trusted_prefixes=[GPT2Module.__module__])
    skeleton = GPT2Module(seed=1)  # the user's own class, float, other random weights
    into = load_compressed(path, model=skeleton)
    assert into is skeleton
    for loaded in (rebuilt, into):
        assert [type(loaded.get_submodule(name)) for name in CONV1D_NAMES] == [Int8Conv1D] * 8
        assert torch.equal(logits(loaded.eval()), expected)


def test_a_deep_copy_of_the_int8_gpt2_gives_identical_logits(
    qat_gpt2: tuple[GPT2Module, list[nn.Parameter], list[nn.Module]],
) -> None:
    int8 = convert_to_int8(qat_gpt2[0])
    expected = logits(int8)  # packs every layer's oneDNN weight first
    assert torch.equal(logits(copy.deepcopy(int8)), expected)


def test_weight_only_qat_on_gpt2_converts_to_int8_weights_that_compute_in_float(tmp_path: Path) -> None:
    module = GPT2Module()
    callback = QuantizationAwareTraining(activation_bits=None)
    fit(module, [callback], tmp_path, steps=3)
    layers = [module.get_submodule(name) for name in CONV1D_NAMES]
    assert all(type(layer) is QATConv1D and layer.input_observer is None for layer in layers)
    int8 = callback.int8_model
    assert all(int8.get_submodule(name).activation_bits is None for name in CONV1D_NAMES)
    expected, actual = logits(module.eval()), logits(int8)
    assert bool(torch.isfinite(actual).all()) and relative_error(actual, expected) <= 1e-5


def test_pruning_2_of_4_and_qat_on_gpt2_give_int8_conv1d_integers_with_at_most_2_of_every_4_inputs(
    tmp_path: Path,
) -> None:
    module = GPT2Module()
    pruning = GradualPruning(pattern="2:4", end_step=1, update_every=1)
    qat = QuantizationAwareTraining(activation_bits=8, start_step=1)
    fit(module, [qat, pruning], tmp_path, steps=4)  # listed QAT first: composition orders them
    int8 = qat.int8_model
    for name in CONV1D_NAMES:
        integers = int8.get_submodule(name).qweight  # (out, in)
        groups = (integers != 0).reshape(integers.shape[0], -1, 4).sum(dim=-1)
        assert int(groups.max()) <= 2, name
        assert float((integers == 0).float().mean()) >= 0.5, name
    assert bool(torch.isfinite(logits(int8)).all())
