"""Factorised layers and rank selection: LowRankLinear / LowRankConv2d compute what the dense layer computes at full
rank, the rank mask is the truncated SVD, truncation shrinks shapes without changing outputs, and the ranks chosen
from a ratio, an energy or a budget are the ones the docstrings promise."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from lightning_compress import LowRankRefactoring, load_compressed, save_compressed
from lightning_compress.lowrank import (
    LayerSpectrum,
    LowRankConv2d,
    LowRankLinear,
    factor,
    rank_for_energy,
    rank_for_ratio,
    ranks_for_budget,
)
from lightning_compress.models import ImageClassifier
from lightning_compress.monitor import measure_model


def keep_top(layer: LowRankLinear | LowRankConv2d, rank: int) -> torch.Tensor:
    """Switch on the ``rank`` most important components of ``layer`` (what the callback does); return the mask."""
    keep = torch.zeros_like(layer.rank_mask)
    keep[torch.topk(layer.component_importance(), rank).indices] = True
    layer.set_rank_mask(keep)
    return keep


def effective_weight(layer: LowRankLinear) -> torch.Tensor:
    """The ``[out, in]`` matrix the layer applies, read off its outputs on the identity."""
    with torch.no_grad():
        out = layer(torch.eye(layer.in_features))
    return (out - (0 if layer.bias is None else layer.bias)).T


def spectrum(name: str, out: int, inp: int, singular: list[float] | None = None) -> LayerSpectrum:
    values = torch.tensor(singular) if singular is not None else torch.ones(min(out, inp))
    return LayerSpectrum(name, out, inp, values)


# ---------------------------------------------------------------------------------------------------------- factor


@pytest.mark.parametrize("shape", [(12, 20), (20, 12), (16, 16)])
def test_factor_reproduces_the_weight_with_descending_singular_values(shape: tuple[int, int]) -> None:
    torch.manual_seed(0)
    weight = torch.randn(*shape)
    first, second, singular = factor(weight)
    rank = min(shape)
    assert first.shape == (rank, shape[1]) and second.shape == (shape[0], rank)
    assert first.dtype == second.dtype == torch.float32
    torch.testing.assert_close(second @ first, weight, atol=1e-5, rtol=1e-5)
    assert singular.shape == (rank,)
    assert bool((singular[:-1] >= singular[1:]).all())
    torch.testing.assert_close(singular, torch.linalg.svdvals(weight), atol=1e-5, rtol=1e-5)
    # each component carries sqrt(s_i) on both sides: ||first_i|| = ||second_i|| = sqrt(s_i)
    torch.testing.assert_close(first.norm(dim=1), singular.sqrt(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(second.norm(dim=0), singular.sqrt(), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------- full-rank equivalence


@pytest.mark.parametrize("bias", [True, False])
def test_lowrank_linear_at_full_rank_computes_what_the_linear_computes(bias: bool) -> None:
    torch.manual_seed(0)
    linear = nn.Linear(24, 16, bias=bias)
    layer, singular = LowRankLinear.from_linear(linear)
    assert (layer.rank, layer.active_rank) == (16, 16)
    assert layer.first.shape == (16, 24) and layer.second.shape == (16, 16)
    assert (layer.bias is None) == (not bias)
    torch.testing.assert_close(singular, torch.linalg.svdvals(linear.weight.detach()), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.component_importance(), singular, atol=1e-5, rtol=1e-5)
    x = torch.randn(8, 24)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), linear(x), atol=1e-5, rtol=1e-5)


def test_lowrank_linear_takes_token_batches_of_a_transformer() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(32, 48)
    layer, _ = LowRankLinear.from_linear(linear)
    x = torch.randn(4, 7, 32)
    with torch.no_grad():
        got = layer(x)
        torch.testing.assert_close(got, linear(x), atol=1e-5, rtol=1e-5)
    assert got.shape == (4, 7, 48)


CONVS: dict[str, dict[str, Any]] = {
    "stride2-pad1": {"kernel_size": 3, "stride": 2, "padding": 1},
    "dilation2-pad2": {"kernel_size": 3, "padding": 2, "dilation": 2},
    "rect-kernel-stride-pad": {"kernel_size": (3, 5), "stride": (2, 1), "padding": (1, 2)},
    "same": {"kernel_size": 3, "padding": "same"},
    "same-even-kernel": {"kernel_size": 4, "padding": "same", "dilation": 2},  # asymmetric padding
    "valid": {"kernel_size": 3, "padding": "valid"},
    "no-bias": {"kernel_size": 3, "padding": 1, "bias": False},
}


@pytest.mark.parametrize("config", CONVS.values(), ids=CONVS.keys())
def test_lowrank_conv2d_at_full_rank_computes_what_the_conv_computes(config: dict[str, Any]) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 10, **config)
    layer, singular = LowRankConv2d.from_conv2d(conv)
    kh, kw = conv.kernel_size
    full = min(10, 6 * kh * kw)
    assert layer.rank == layer.active_rank == full == singular.numel()
    assert layer.first.shape == (full, 6, kh, kw) and layer.second.shape == (10, full)
    x = torch.randn(2, 6, 13, 11)
    with torch.no_grad():
        expected, got = conv(x), layer(x)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("config", "named"), [({"groups": 2}, "groups=2"), ({"padding_mode": "reflect"}, "padding_mode='reflect'")]
)
def test_grouped_or_non_zero_padded_convolutions_are_refused(config: dict[str, Any], named: str) -> None:
    conv = nn.Conv2d(4, 8, 3, padding=1, **config)
    with pytest.raises(ValueError, match="groups=1 and zero padding") as err:
        LowRankConv2d.from_conv2d(conv)
    assert named in str(err.value) and "HINT: exclude this layer" in str(err.value)
    # the callback leaves such a layer dense and says why instead of failing
    model = nn.Sequential(conv, nn.Flatten(), nn.Linear(8 * 6 * 6, 64))
    layers, _, skipped = LowRankRefactoring(rank_ratio=0.25, end_step=10).prepare(model)
    assert list(layers) == ["2"] and isinstance(model[0], nn.Conv2d)
    assert skipped == {"0": "grouped or non-zero-padded convolution"}


# ------------------------------------------------------------------------------------------------------ rank mask


def test_the_top_r_mask_right_after_factorising_is_the_truncated_svd() -> None:
    """Eckart-Young: the masked layer applies ``U_r S_r V_r^T``, and its error is the discarded singular values."""
    torch.manual_seed(0)
    linear = nn.Linear(20, 14)
    layer, _ = LowRankLinear.from_linear(linear)
    weight = linear.weight.detach().double()
    u, s, vh = torch.linalg.svd(weight, full_matrices=False)
    for rank in (13, 5, 1):  # falling, as the callback lowers it: switched-off components have importance 0
        keep = keep_top(layer, rank)
        assert layer.active_rank == rank and int(keep.sum()) == rank
        assert bool(keep[:rank].all())  # the components come out of the SVD in descending order
        best = (u[:, :rank] * s[:rank]) @ vh[:rank]
        applied = effective_weight(layer).double()
        torch.testing.assert_close(applied, best, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close((weight - applied).norm(), s[rank:].norm(), atol=1e-5, rtol=1e-5)
    layer.set_rank_mask(torch.ones(14, dtype=torch.bool))
    assert layer.active_rank == 14
    torch.testing.assert_close(effective_weight(layer), linear.weight.detach(), atol=1e-5, rtol=1e-5)


def test_importance_of_switched_off_components_is_zero() -> None:
    torch.manual_seed(0)
    layer, singular = LowRankLinear.from_linear(nn.Linear(10, 8))
    keep = keep_top(layer, 3)
    importance = layer.component_importance()
    assert bool((importance[~keep] == 0).all())
    torch.testing.assert_close(importance[keep], singular[:3], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_truncated_layer_is_smaller_and_computes_the_same(kind: str) -> None:
    torch.manual_seed(0)
    if kind == "linear":
        layer, _ = LowRankLinear.from_linear(nn.Linear(40, 30))
        x = torch.randn(6, 5, 40)
    else:
        layer, _ = LowRankConv2d.from_conv2d(nn.Conv2d(8, 16, 3, stride=2, padding=1, dilation=1))
        x = torch.randn(2, 8, 9, 9)
    keep = torch.zeros(layer.rank, dtype=torch.bool)
    keep[[0, 2, 3, 7, 11]] = True  # not a prefix: truncation must pick the right rows and columns
    layer.set_rank_mask(keep)
    small = layer.truncated()
    assert type(small) is type(layer)
    assert small.rank == small.active_rank == 5 and bool(small.rank_mask.all())
    assert small.first.shape == (5, *layer.first.shape[1:])
    assert small.second.shape == (layer.second.shape[0], 5)
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in layer.parameters())
    with torch.no_grad():
        torch.testing.assert_close(small(x), layer(x), atol=1e-5, rtol=1e-5)
    assert small.rebuild_args()["rank"] == 5


def test_a_truncated_linear_holds_its_factors_in_the_layout_cpu_gemms_run_fastest() -> None:
    """Shapes as always, memory transposed: F.linear then multiplies by row-major [in, rank] and [rank, out]
    matrices. The layout survives a state-dict round trip and is recorded for save/load_compressed."""
    torch.manual_seed(0)
    layer, _ = LowRankLinear.from_linear(nn.Linear(40, 30))
    assert layer.first.is_contiguous() and not layer.inference_layout  # training layout: what DDP/DeepSpeed expect
    keep_top(layer, 6)
    small = layer.truncated()
    assert small.inference_layout and small.rebuild_args()["inference_layout"] is True
    assert small.first.shape == (6, 40) and small.first.stride() == (1, 6)
    assert small.second.shape == (30, 6) and small.second.stride() == (1, 30)
    again = LowRankLinear(**small.rebuild_args())
    again.load_state_dict(small.state_dict())
    assert again.first.stride() == (1, 6) and torch.equal(again.first, small.first)
    x = torch.randn(7, 40)
    with torch.no_grad():
        torch.testing.assert_close(again(x), layer(x), atol=1e-5, rtol=1e-5)


def test_switched_off_components_receive_zero_gradient() -> None:
    torch.manual_seed(0)
    for layer in (LowRankLinear.from_linear(nn.Linear(12, 10))[0], LowRankConv2d.from_conv2d(nn.Conv2d(3, 10, 3))[0]):
        keep = keep_top(layer, 4)
        x = torch.randn(5, 12) if isinstance(layer, LowRankLinear) else torch.randn(2, 3, 6, 6)
        layer(x).square().sum().backward()
        first, second = layer.first.grad.flatten(1), layer.second.grad
        assert bool((first[~keep] == 0).all()) and bool((second[:, ~keep] == 0).all())
        assert bool((first[keep].abs().sum(1) > 0).all()) and bool((second[:, keep].abs().sum(0) > 0).all())


def test_loading_a_masked_state_into_a_fresh_layer_restores_the_rank_and_outputs() -> None:
    """The host-side active count and the cached mask follow ``load_state_dict`` (also when loaded through a parent)."""
    torch.manual_seed(0)
    trained = nn.Sequential(LowRankLinear.from_linear(nn.Linear(16, 12))[0])
    keep_top(trained[0], 5)
    x = torch.randn(3, 16)
    with torch.no_grad():
        expected = trained(x)
    fresh = nn.Sequential(LowRankLinear(16, 12, rank=12))
    with torch.no_grad():
        fresh(x)  # caches nothing stale: the fresh layer was at full rank
    fresh.load_state_dict(trained.state_dict())
    assert fresh[0].active_rank == 5
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), expected, atol=0, rtol=0)
    # and back: a full mask loaded over a masked layer switches every component on again
    keep_top(fresh[0], 2)
    with torch.no_grad():
        fresh(x)  # the multiplier of rank 2 is cached now
    fresh[0].load_state_dict(LowRankLinear.from_linear(nn.Linear(16, 12))[0].state_dict())
    assert fresh[0].active_rank == 12


def test_a_masked_linear_takes_token_batches_and_plain_batches_in_turn() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(16, 12)
    layer, _ = LowRankLinear.from_linear(linear)
    keep_top(layer, 4)
    with torch.no_grad():
        assert layer(torch.randn(2, 3, 16)).shape == (2, 3, 12)
        assert layer(torch.randn(5, 16)).shape == (5, 12)  # not (1, 5, 12): a cached [1, 1, r] multiplier


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_factorised_and_truncated_layers_keep_the_dtype_of_the_weights(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    layer, _ = LowRankLinear.from_linear(nn.Linear(8, 8).to(dtype))
    assert layer.first.dtype == layer.second.dtype == layer.bias.dtype == dtype
    conv, _ = LowRankConv2d.from_conv2d(nn.Conv2d(2, 4, 3).to(dtype))
    assert conv.first.dtype == dtype
    small = LowRankLinear.from_linear(nn.Linear(8, 8))[0].to(dtype).truncated()
    assert small.first.dtype == dtype


# ---------------------------------------------------------------------------------------------- figures and storage


def test_compression_figures_count_the_active_components() -> None:
    torch.manual_seed(0)
    linear, _ = LowRankLinear.from_linear(nn.Linear(48, 32))
    conv, _ = LowRankConv2d.from_conv2d(nn.Conv2d(8, 16, 3, padding=1, bias=False))
    keep_top(linear, 6)
    keep_top(conv, 5)
    fig = linear.compression_figures()
    assert (fig.weight_shape, fig.params_dense, fig.rank, fig.bits) == ((32, 48), 32 * 48, 6, 32)
    assert fig.params_effective == 6 * (32 + 48)
    assert fig.flops_factor == pytest.approx(6 * (32 + 48) / (32 * 48))
    fig = conv.compression_figures()
    assert fig.weight_shape == (16, 8, 3, 3) and fig.params_effective == 5 * (16 + 8 * 9)
    assert fig.flops_factor == pytest.approx(5 * (16 + 72) / (16 * 72))
    storage = linear.storage()
    assert storage.params_dense == 32 * 48 + 32 and storage.bytes_dense == 4 * (32 * 48 + 32)
    assert storage.bytes_compressed == 4 * 6 * (32 + 48) + 4 * 32  # fp32 factors + the (non-zero) fp32 bias
    assert conv.storage().bytes_compressed == 4 * 5 * (16 + 72)  # no bias


def test_the_monitor_reports_the_truncated_size_while_the_layers_are_only_masked() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 4 * 4, 64))
    dense = measure_model(model)
    callback = LowRankRefactoring(rank_ratio=0.25, end_step=10)
    layers, targets, _ = callback.prepare(model)
    assert targets == {"0": 4, "3": 16}
    assert measure_model(model).bytes_dense == dense.bytes_dense  # the factors count as the weight they replace
    for name, layer in layers.items():
        keep_top(layer, targets[name])
    masked = measure_model(model)
    expected = 4 * (4 * (16 + 27) + 16) + 4 * (16 * (64 + 256) + 64)
    assert masked.bytes_compressed == expected
    callback.truncate(model)
    assert model[3].first.shape == (16, 256)
    truncated = measure_model(model)
    assert truncated.bytes_compressed == masked.bytes_compressed
    assert truncated.params_effective == masked.params_effective == expected // 4


def test_the_monitor_counts_a_factorised_layers_flops_as_dense_times_its_flops_factor() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
    x = torch.randn(4, 64)
    dense = measure_model(model, x).flops_dense
    layers, targets, _ = LowRankRefactoring(rank_ratio=0.25, end_step=10).prepare(model)
    for name, layer in layers.items():
        keep_top(layer, targets[name])
    report = measure_model(model, x)
    assert report.flops_dense == dense  # not the full-rank factor matmuls that run (2x)
    assert report.flops_effective == dense * 16 * 128 // (64 * 64)  # the mask counts


# ------------------------------------------------------------------------------------------------------- ranks.py


def test_rank_for_ratio_rounds_up_and_keeps_at_least_one() -> None:
    s = spectrum("a", 32, 9)  # full rank 9
    assert rank_for_ratio(s, 0.25) == 3  # ceil(2.25)
    assert rank_for_ratio(s, 1 / 3) == 3
    assert rank_for_ratio(s, 1.0) == 9
    assert rank_for_ratio(s, 0.01) == 1
    assert rank_for_ratio(spectrum("b", 1024, 1024), 0.125) == 128


def test_rank_for_ratio_is_not_bumped_by_float_rounding() -> None:
    assert rank_for_ratio(spectrum("a", 100, 200), 0.07) == 7
    assert rank_for_ratio(spectrum("b", 25, 40), 0.28) == 7


def test_rank_for_energy_is_the_smallest_rank_holding_that_share_of_squares() -> None:
    s = spectrum("a", 3, 5, [3.0, 2.0, 1.0])  # squares 9, 4, 1: cumulative shares 9/14, 13/14, 1
    assert rank_for_energy(s, 0.5) == 1
    assert rank_for_energy(s, 9 / 14) == 1  # exactly reached counts
    assert rank_for_energy(s, 9 / 14 + 1e-6) == 2
    assert rank_for_energy(s, 13 / 14) == 2
    assert rank_for_energy(s, 0.95) == 3
    assert rank_for_energy(s, 1.0) == 3
    assert rank_for_energy(spectrum("z", 3, 3, [0.0, 0.0, 0.0]), 0.9) == 1  # a zero layer keeps one direction


@pytest.mark.parametrize(("out", "inp", "expected"), [(1024, 1024, 511), (10, 128, 9), (64, 288, 52), (2, 2, 0)])
def test_break_even_rank_is_the_largest_rank_with_fewer_weights_than_dense(out: int, inp: int, expected: int) -> None:
    s = spectrum("a", out, inp)
    assert s.break_even_rank == expected
    assert s.params_at(expected) < s.dense_params <= s.params_at(expected + 1)


def test_ranks_for_budget_respects_it_and_gives_the_slow_decaying_spectrum_the_rank_it_needs() -> None:
    """Every layer keeps about the same share of its energy: one direction gives ``fast`` 99 %, so the rest of the
    budget goes to the spectra that need many directions for any share."""
    fast = spectrum("fast", 64, 64, [10.0**-i for i in range(64)])  # one direction holds 99 % of the energy
    slow = spectrum("slow", 64, 64, [1.0 / (1 + i) ** 0.25 for i in range(64)])
    wide = spectrum("wide", 32, 96, [1.0 / (1 + i) ** 0.25 for i in range(32)])
    spectra = [fast, slow, wide]
    dense = sum(s.dense_params for s in spectra)  # every direction costs 128 weights in each of these layers
    for budget in (0.1, 0.25, 0.4):
        ranks = ranks_for_budget(spectra, budget)
        spent = sum(s.params_at(ranks[s.name]) for s in spectra)
        assert budget * dense - 128 < spent <= budget * dense  # spent down to less than one more direction
        assert ranks["slow"] > ranks["fast"] == 1
        assert all(1 <= ranks[s.name] <= s.break_even_rank for s in spectra)
    # a generous budget stops every layer at its break-even rank (31, 31, 23): more rank would not save weights
    assert ranks_for_budget(spectra, 1.0) == {"fast": 31, "slow": 31, "wide": 23}


def test_ranks_for_budget_leaves_layers_no_rank_shrinks_dense_and_charges_them() -> None:
    tiny = spectrum("tiny", 2, 2, [1.0, 1.0])  # break-even rank 0: stays dense, its 4 weights count
    big = spectrum("big", 16, 16, [1.0] * 16)  # 32 weights per direction
    ranks = ranks_for_budget([tiny, big], 0.25)  # 65 weights: 4 dense + rank 1 (32); one more would make 100
    assert ranks == {"big": 1}
    assert ranks_for_budget([tiny, big], 0.5) == {"big": 3}  # 130 weights: 4 + 3 x 32 = 100, 4 x 32 would be 132
    with pytest.raises(ValueError, match="`param_budget`"):
        ranks_for_budget([tiny], 1.0)


def test_ranks_for_budget_names_param_budget_when_rank_one_does_not_fit() -> None:
    spectra = [spectrum("a", 8, 8), spectrum("b", 8, 8)]  # rank 1 everywhere: 32 of 128 weights
    assert ranks_for_budget(spectra, 0.25) == {"a": 1, "b": 1}
    with pytest.raises(ValueError, match=r"`param_budget`=0\.2 allows 25 weights.*already needs 32") as err:
        ranks_for_budget(spectra, 0.2)
    assert "HINT" in str(err.value)


# --------------------------------------------------------------------------------------------------- file round trip


def test_a_truncated_model_saves_and_loads_without_a_skeleton(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = ImageClassifier(image_size=8).eval()
    callback = LowRankRefactoring(rank_ratio=0.25, end_step=10)
    layers, targets, skipped = callback.prepare(model)
    assert skipped == {}
    assert targets == {"net.conv1": 3, "net.conv2": 16, "net.fc1": 32, "net.fc2": 3}
    for name, layer in layers.items():
        keep_top(layer, targets[name])
    callback.truncate(model)
    assert {n: m.rank for n, m in model.named_modules() if isinstance(m, (LowRankLinear, LowRankConv2d))} == targets
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        expected = model(x)
    path = tmp_path / "lowrank.safetensors"
    save_compressed(model, path)
    loaded = load_compressed(path)
    assert isinstance(loaded, ImageClassifier)
    assert isinstance(loaded.net.conv2, LowRankConv2d) and isinstance(loaded.net.fc1, LowRankLinear)
    assert loaded.net.conv2.first.shape == model.net.conv2.first.shape == (16, 32, 3, 3)
    assert loaded.net.fc2.active_rank == 3
    assert loaded.net.fc1.inference_layout and loaded.net.fc1.first.stride() == (1, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)


def test_a_masked_model_loads_without_a_skeleton_at_its_active_rank(tmp_path: Path) -> None:
    """Saved mid-training (masked, not truncated): the rebuilt layers hold the full rank and the saved mask."""
    torch.manual_seed(0)
    model = ImageClassifier(image_size=8).eval()
    layers, targets, _ = LowRankRefactoring(rank_ratio=0.25, end_step=10).prepare(model)
    for name, layer in layers.items():
        keep_top(layer, targets[name])
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        expected = model(x)
    save_compressed(model, tmp_path / "masked.safetensors")
    loaded = load_compressed(tmp_path / "masked.safetensors")
    assert (loaded.net.fc1.rank, loaded.net.fc1.active_rank) == (128, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)
