"""Factorised layers are drop-ins for the layers they replace: they keep the replaced layer's attributes and a
``weight`` of its shape, dtype and device (model code casts inputs to ``layer.weight.dtype``), whose product is formed
only when computed with; transformers' Conv1D factorises; tiny real T5, ViT and GPT-2 models compute the same with
every layer factorised at full rank."""

from __future__ import annotations

import copy
import gc
import json
import pickle
from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_compress import load_compressed, save_compressed
from lightning_compress.lowrank.factorised import _Factorised
from lightning_compress.lowrank.layers import (
    LowRankConv1D,
    LowRankConv2d,
    LowRankLinear,
    factorise_layer,
    weight_matrix,
)

transformers = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402


def conv1d(nx: int = 12, nf: int = 20) -> nn.Module:
    layer = Conv1D(nf, nx)
    with torch.no_grad():
        layer.bias.normal_()
    return layer


DENSE = {
    "linear": lambda: nn.Linear(12, 20),
    "conv2d": lambda: nn.Conv2d(3, 8, kernel_size=(3, 2), stride=2, padding=1, dilation=(1, 2)),
    "conv1d": conv1d,
}
INPUTS = {"linear": (4, 12), "conv2d": (2, 3, 9, 9), "conv1d": (2, 5, 12)}


def replace_all(model: nn.Module, types: tuple[type[nn.Module], ...], keep: tuple[str, ...] = ()) -> list[str]:
    """Put the full-rank factorisation in place of every module of ``types`` not named in ``keep``; their names."""
    names = [name for name, module in model.named_modules() if isinstance(module, types) and name not in ("", *keep)]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, factorise_layer(getattr(parent, child))[0])
    return names


def mask_to(layer: _Factorised, rank: int) -> None:
    keep = torch.zeros_like(layer.rank_mask)
    keep[torch.topk(layer.component_importance(), rank).indices] = True
    layer.set_rank_mask(keep)


def count_products(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count every ``dense_weight()`` a factorised layer forms from now on."""
    calls = [0]
    original = _Factorised.dense_weight

    def counted(self: _Factorised) -> torch.Tensor:
        calls[0] += 1
        return original(self)

    monkeypatch.setattr(_Factorised, "dense_weight", counted)
    return calls


def unique_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() counts a tied weight once


# ------------------------------------------------------------------------------------------------------- weight


@pytest.mark.parametrize("kind", DENSE)
def test_weight_is_the_replaced_layers_weight_in_its_layout_dtype_and_device(kind: str) -> None:
    torch.manual_seed(0)
    dense = DENSE[kind]()
    layer, _ = factorise_layer(dense)
    weight = layer.weight
    assert isinstance(weight, torch.Tensor) and not isinstance(weight, nn.Parameter)
    assert weight.shape == dense.weight.shape and weight.dtype == dense.weight.dtype
    assert weight.device == dense.weight.device and weight.requires_grad
    torch.testing.assert_close(weight + 0, dense.weight.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.dense_weight(), dense.weight.detach(), atol=1e-5, rtol=1e-5)
    x = torch.randn(INPUTS[kind])
    torch.testing.assert_close(layer(x), dense(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_a_masked_weight_is_what_the_layer_computes(kind: str) -> None:
    torch.manual_seed(0)
    layer, _ = factorise_layer(DENSE[kind]())
    mask_to(layer, 5)
    x = torch.randn(7, 12)
    matrix = layer.weight.t() if kind == "conv1d" else layer.weight  # the [out, in] matrix either way
    with torch.no_grad():
        torch.testing.assert_close(layer(x), x @ matrix.t() + layer.bias, atol=1e-5, rtol=1e-5)
    assert torch.linalg.matrix_rank(layer.dense_weight().detach()) == 5


def test_reading_weight_metadata_forms_no_product(monkeypatch: pytest.MonkeyPatch) -> None:
    layer, _ = LowRankLinear.from_linear(nn.Linear(12, 20))
    products = count_products(monkeypatch)
    weight = layer.weight
    facts = (weight.dtype, weight.device, weight.shape, weight.size(0), weight.dim(), weight.ndim, weight.numel(),
             weight.requires_grad, weight.is_floating_point(), isinstance(weight, torch.Tensor))  # fmt: skip
    assert facts == (torch.float32, torch.device("cpu"), (20, 12), 20, 2, 2, 240, True, True, True)
    x = torch.randn(3, 12, dtype=torch.float64).to(layer.weight.dtype)
    assert products == [0]
    torch.testing.assert_close(x @ layer.weight.T, layer(x) - layer.bias)
    assert products == [1]


def test_the_weight_view_is_kept_per_layer_without_keeping_the_layer_or_its_copies_from_working() -> None:
    layer, _ = LowRankLinear.from_linear(nn.Linear(12, 20))
    view = layer.weight
    assert layer.weight is view  # one view per layer while its metadata stays
    layer.double()
    assert layer.weight is not view and layer.weight.dtype == torch.float64
    twin = copy.deepcopy(layer)
    restored = pickle.loads(pickle.dumps(layer))
    x = torch.randn(3, 12, dtype=torch.float64)
    for other in (twin, restored):
        assert torch.equal(other(x), layer(x)) and torch.equal(other.weight + 0, layer.weight + 0)
    view = layer.weight
    del layer
    gc.collect()
    with pytest.raises(RuntimeError, match=r"layer that no longer exists.*HINT: keep `layer.dense_weight\(\)`"):
        view + 0


def test_weight_is_differentiable_into_the_factors_and_not_into_switched_off_components() -> None:
    torch.manual_seed(0)
    layer, _ = LowRankLinear.from_linear(nn.Linear(12, 20))
    mask_to(layer, 4)
    (layer.weight.square().sum()).backward()
    keep = layer.rank_mask
    first, second = layer.first.detach(), layer.second.detach()
    product = second[:, keep] @ first[keep]
    torch.testing.assert_close(layer.first.grad[keep], 2 * second[:, keep].T @ product)
    torch.testing.assert_close(layer.second.grad[:, keep], 2 * product @ first[keep].T)
    assert not layer.first.grad[~keep].any() and not layer.second.grad[:, ~keep].any()


def test_weight_is_read_only_and_says_what_to_edit_instead() -> None:
    layer, _ = LowRankLinear.from_linear(nn.Linear(12, 20))
    before = layer.first.detach().clone()
    writes = [
        lambda: layer.weight.mul_(2),
        lambda: nn.init.normal_(layer.weight),
        lambda: layer.weight.__setitem__(0, 1.0),
        lambda: setattr(layer.weight, "data", torch.zeros(20, 12)),
        lambda: layer.weight.requires_grad_(False),
    ]
    for write in writes:
        with pytest.raises(RuntimeError, match=r"`LowRankLinear.weight` is read-only.*HINT: edit `first`/`second`"):
            write()
    assert torch.equal(layer.first, before)
    dense = nn.Linear(12, 20)
    with torch.no_grad():
        dense.weight.copy_(layer.weight)  # reading it into another tensor is not a write
    torch.testing.assert_close(dense.weight, layer.dense_weight().detach())


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_weight_follows_the_factors_when_the_layer_moves(dtype: torch.dtype) -> None:
    layer, _ = LowRankConv2d.from_conv2d(nn.Conv2d(3, 8, 3))
    layer.to(dtype)
    assert layer.weight.dtype == dtype and layer.dense_weight().dtype == dtype
    assert layer.truncated().weight.dtype == dtype


def test_weight_metadata_works_on_zero3_partitioned_factors_and_values_raise_clearly() -> None:
    """Outside forward, ZeRO-3 leaves each rank an empty local tensor and the full shape in ``ds_shape``."""
    layer, _ = LowRankLinear.from_linear(nn.Linear(12, 20))
    for param in (layer.first, layer.second):
        param.ds_shape, param.ds_id = tuple(param.shape), 0
        param.data = torch.empty(0)
    weight = layer.weight
    assert (weight.shape, weight.dtype) == ((20, 12), torch.float32)
    with pytest.raises(RuntimeError, match=r"ZeRO-3 holds `first` partitioned.*HINT: read it inside forward"):
        weight.sum()


# --------------------------------------------------------------------------------------------------- attributes


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv2d(3, 8, 3),
        nn.Conv2d(4, 6, kernel_size=(3, 1), stride=(2, 1), padding=(1, 0), dilation=2, bias=False),
        nn.Conv2d(2, 5, 3, padding="same"),
    ],
    ids=["plain", "strided", "same"],
)
def test_a_factorised_conv2d_keeps_the_convs_attributes(conv: nn.Conv2d) -> None:
    layer, _ = LowRankConv2d.from_conv2d(conv)
    names = ["in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups", "padding_mode"]
    for each in (layer, layer.truncated()):
        assert {n: getattr(each, n) for n in names} == {n: getattr(conv, n) for n in names}
    text = repr(layer)
    assert f"{conv.in_channels}, {conv.out_channels}, kernel_size={conv.kernel_size}, rank={layer.rank}" in text
    assert f"stride={conv.stride}, padding={conv.padding}, dilation={conv.dilation}" in text


def test_a_factorised_linear_and_conv1d_keep_their_feature_attributes() -> None:
    linear, _ = LowRankLinear.from_linear(nn.Linear(12, 20, bias=False))
    assert (linear.in_features, linear.out_features) == (12, 20)
    assert "in_features=12, out_features=20, rank=12" in repr(linear)
    layer, _ = LowRankConv1D.from_conv1d(conv1d(nx=12, nf=20))
    assert (layer.nx, layer.nf, layer.in_features, layer.out_features) == (12, 20, 12, 20)
    assert repr(layer).startswith("LowRankConv1D(nf=20, nx=12, in_features=12, out_features=20, rank=12")
    assert isinstance(layer, LowRankLinear)


def test_weight_matrix_is_the_out_by_in_matrix_of_every_supported_layer() -> None:
    shapes = {kind: tuple(weight_matrix(make()).shape) for kind, make in DENSE.items()}
    assert shapes == {"linear": (20, 12), "conv2d": (8, 3 * 3 * 2), "conv1d": (20, 12)}
    layer = conv1d()
    assert torch.equal(weight_matrix(layer), layer.weight.t())


def test_factorise_names_the_supported_types_and_from_linear_refuses_a_conv1d() -> None:
    with pytest.raises(TypeError, match=r"`module` is a Embedding.*nn.Linear, nn.Conv2d.*Conv1D.*HINT: exclude"):
        factorise_layer(nn.Embedding(10, 4))
    with pytest.raises(TypeError, match=r"transformers Conv1D.*HINT: LowRankConv1D.from_conv1d"):
        LowRankLinear.from_linear(conv1d())
    with pytest.raises(TypeError, match=r"`conv1d` must be a transformers.pytorch_utils.Conv1D, got Linear"):
        LowRankConv1D.from_conv1d(nn.Linear(3, 4))


# -------------------------------------------------------------------------------------------------------- Conv1D


def test_a_conv1d_made_dense_again_is_a_conv1d_computing_the_same() -> None:
    torch.manual_seed(0)
    layer, _ = LowRankConv1D.from_conv1d(conv1d())
    mask_to(layer, 6)
    dense = layer.to_dense()
    assert type(dense) is Conv1D and (dense.nf, dense.nx) == (20, 12)
    x = torch.randn(3, 12)
    with torch.no_grad():
        torch.testing.assert_close(dense(x), layer(x), atol=1e-5, rtol=1e-5)


def test_a_conv1d_layer_rebuilds_from_its_json_args_and_state() -> None:
    torch.manual_seed(0)
    layer, _ = LowRankConv1D.from_conv1d(conv1d())
    mask_to(layer, 6)
    small = layer.truncated()
    for original in (layer, small):
        args = json.loads(json.dumps(original.rebuild_args()))
        rebuilt = type(original)(**args)
        rebuilt.load_state_dict(original.state_dict())
        assert type(rebuilt) is LowRankConv1D and rebuilt.weight.shape == (12, 20)
        x = torch.randn(3, 12)
        with torch.no_grad():
            assert torch.equal(rebuilt(x), original(x))


# ------------------------------------------------------------------------------------------- transformers models


def tiny_t5() -> nn.Module:
    """In training mode, without dropout (so that two models compare)."""
    config = transformers.T5Config(d_model=32, d_ff=64, num_layers=2, num_heads=2, d_kv=16, vocab_size=100,
                                   dropout_rate=0.0)  # fmt: skip
    return transformers.T5ForConditionalGeneration(config).train()


def tiny_vit() -> nn.Module:
    """In training mode, without dropout."""
    config = transformers.ViTConfig(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2,
                                    num_attention_heads=2, intermediate_size=64, num_channels=3,
                                    hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # fmt: skip
    return transformers.ViTForImageClassification(config).train()


def tiny_gpt2() -> nn.Module:
    config = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=2, vocab_size=100, n_positions=32)
    return transformers.GPT2LMHeadModel(config)


def t5_loss(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 100, (2, 7), generator=generator)
    decoder_ids = torch.randint(0, 100, (2, 6), generator=generator)
    logits = model(input_ids=ids, decoder_input_ids=decoder_ids[:, :-1]).logits
    return logits, nn.functional.cross_entropy(logits.flatten(0, 1).float(), decoder_ids[:, 1:].flatten())


def test_t5_with_every_linear_factorised_trains_and_computes_what_the_dense_t5_computes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """T5's feed-forward reads ``wo.weight`` (``isinstance``, ``.dtype``) on every call: today's crash."""
    torch.manual_seed(0)
    dense = tiny_t5()
    low = tiny_t5()
    low.load_state_dict(dense.state_dict())
    names = replace_all(low, (nn.Linear,), keep=("lm_head",))  # tied to the token embedding `shared`
    assert "encoder.block.0.layer.1.DenseReluDense.wo" in names and len(names) == 32
    products = count_products(monkeypatch)
    logits, loss = t5_loss(low)
    assert products == [0]  # the feed-forward only read the weight's metadata
    dense_logits, dense_loss = t5_loss(dense)
    torch.testing.assert_close(logits, dense_logits, atol=1e-4, rtol=1e-4)
    loss.backward()
    dense_loss.backward()
    torch.testing.assert_close(low.shared.weight.grad, dense.shared.weight.grad, atol=1e-5, rtol=1e-4)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in low.parameters())


def test_t5_keeps_a_factorised_wo_in_float32_inside_a_bfloat16_model() -> None:
    """transformers keeps ``wo`` in fp32 (``_keep_in_fp32_modules``) and casts the hidden states to its dtype."""
    torch.manual_seed(0)
    model = tiny_t5()
    replace_all(model, (nn.Linear,))
    model.to(torch.bfloat16)
    for name, module in model.named_modules():
        if name.endswith("DenseReluDense.wo"):
            module.float()
            assert module.weight.dtype == torch.float32
    logits, loss = t5_loss(model)
    loss.backward()
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()


def test_vit_with_every_linear_and_conv_factorised_trains_and_computes_what_the_dense_vit_computes() -> None:
    """ViT casts the pixels to ``patch_embeddings.projection.weight.dtype``: float64 pixels must still work."""
    torch.manual_seed(0)
    dense = tiny_vit()
    low = tiny_vit()
    low.load_state_dict(dense.state_dict())
    names = replace_all(low, (nn.Linear, nn.Conv2d))
    assert isinstance(low.vit.embeddings.patch_embeddings.projection, LowRankConv2d) and len(names) == 14
    pixels = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    labels = torch.tensor([0, 1])
    out, dense_out = low(pixel_values=pixels, labels=labels), dense(pixel_values=pixels, labels=labels)
    torch.testing.assert_close(out.logits, dense_out.logits, atol=1e-5, rtol=1e-4)
    out.loss.backward()
    dense_out.loss.backward()
    cls_token = low.vit.embeddings.cls_token.grad
    torch.testing.assert_close(cls_token, dense.vit.embeddings.cls_token.grad, atol=1e-5, rtol=1e-4)


def test_gpt2_with_every_conv1d_factorised_gives_the_dense_logits_and_shrinks_when_truncated() -> None:
    torch.manual_seed(0)
    model = tiny_gpt2().eval()
    ids = torch.randint(0, 100, (2, 9))
    with torch.no_grad():
        expected = model(ids).logits
    weights = {name: m.weight.detach().clone() for name, m in model.named_modules() if isinstance(m, Conv1D)}
    dense_params = unique_parameters(model)
    names = replace_all(model, (Conv1D,))
    assert sorted(names) == sorted(weights) and len(names) == 8
    for name in names:
        layer = model.get_submodule(name)
        assert isinstance(layer, LowRankConv1D) and layer.weight.shape == weights[name].shape
        torch.testing.assert_close(layer.weight + 0, weights[name], atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, expected, atol=1e-5, rtol=1e-5)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        layer = model.get_submodule(name)
        mask_to(layer, 16)
        setattr(model.get_submodule(parent_name), child, layer.truncated())
    assert unique_parameters(model) < dense_params
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()


def test_a_factorised_gpt2_exports_and_loads_into_a_skeleton_rebuilt_from_its_args(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = tiny_gpt2().eval()
    for name in replace_all(model, (Conv1D,)):
        parent_name, _, child = name.rpartition(".")
        layer = model.get_submodule(name)
        mask_to(layer, 16)
        setattr(model.get_submodule(parent_name), child, layer.truncated())
    ids = torch.randint(0, 100, (2, 9))
    with torch.no_grad():
        expected = model(ids).logits
    save_compressed(model, tmp_path / "gpt2.safetensors")
    skeleton = tiny_gpt2().eval()
    for name, module in model.named_modules():
        if isinstance(module, LowRankConv1D):
            parent_name, _, child = name.rpartition(".")
            rebuilt = type(module)(**json.loads(json.dumps(module.rebuild_args())))
            setattr(skeleton.get_submodule(parent_name), child, rebuilt)
    loaded = load_compressed(tmp_path / "gpt2.safetensors", model=skeleton)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, expected)
