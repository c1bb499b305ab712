"""The activation-whitened rebase: exact at full rank, optimal when truncated, and optimizer moments that follow it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_compress.lowrank import LowRankConv2d, LowRankLinear, factor
from lightning_compress.lowrank.statistics import LayerStatistics, sync
from lightning_compress.lowrank.whitening import carry_state, whitened_factors


def correlated_inputs(rows: int, n: int, seed: int = 0) -> torch.Tensor:
    """Inputs whose energy sits in a few directions, as activations of a trained network do."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(1, -2, n, dtype=torch.float64)
    basis = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0]
    return (torch.randn(rows, n, generator=g, dtype=torch.float64) * scales) @ basis.T


def plain_factors(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    first, second, _ = factor(weight)
    return first, second


@pytest.mark.parametrize(("out", "n"), [(24, 40), (40, 24), (32, 32)])
def test_the_rebased_factors_compute_the_same_weight_at_full_rank(out: int, n: int) -> None:
    torch.manual_seed(0)
    weight = torch.randn(out, n, dtype=torch.float64)
    first0, second0 = plain_factors(weight)
    x = correlated_inputs(500, n)
    rebased = whitened_factors(first0, second0, x.T @ x / len(x))
    assert rebased.first.shape == first0.shape and rebased.second.shape == second0.shape
    torch.testing.assert_close(rebased.second @ rebased.first, weight, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(rebased.transform @ first0, rebased.first, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(second0 @ rebased.inverse, rebased.second, rtol=1e-8, atol=1e-8)


def test_hidden_components_are_uncorrelated_on_the_data_with_mean_square_the_singular_value() -> None:
    torch.manual_seed(1)
    weight = torch.randn(30, 20, dtype=torch.float64)
    x = correlated_inputs(2000, 20)
    moment = x.T @ x / len(x)
    rebased = whitened_factors(*plain_factors(weight), moment)
    hidden_moment = rebased.first @ moment @ rebased.first.T
    singular = rebased.singular_values.double()
    # up to the ridge that keeps unseen input directions invertible (DAMPING of the mean input energy)
    torch.testing.assert_close(hidden_moment, torch.diag(singular), rtol=1e-4, atol=1e-4 * float(singular[0]))
    assert torch.all(rebased.singular_values[:-1] >= rebased.singular_values[1:])


def test_truncating_the_rebased_factors_loses_least_output_energy_on_the_data() -> None:
    """Keeping the r strongest whitened components leaves exactly the tail of the whitened spectrum as output error
    (the optimum over all rank-r matrices, Eckart-Young in the data's metric), far less than truncating the SVD."""
    torch.manual_seed(2)
    weight = torch.randn(48, 48, dtype=torch.float64)
    x = correlated_inputs(4000, 48)
    moment = x.T @ x / len(x)
    first0, second0 = plain_factors(weight)
    rebased = whitened_factors(first0, second0, moment)
    r = 12

    def output_error(first: torch.Tensor, second: torch.Tensor) -> float:
        return float(((x @ (weight - second[:, :r] @ first[:r]).T) ** 2).sum(1).mean())

    whitened, plain = output_error(rebased.first, rebased.second), output_error(first0, second0)
    tail = float(rebased.singular_values[r:].double().square().sum())
    assert whitened == pytest.approx(tail, rel=1e-4)
    assert whitened < 0.2 * plain


def test_gradients_and_first_moments_carried_into_the_new_basis_are_exact() -> None:
    """The same loss, differentiated with respect to the old and the new factors (which compute the same weight):
    carrying the old gradient gives the new one, so a running average of gradients transforms exactly."""
    torch.manual_seed(3)
    weight = torch.randn(16, 24, dtype=torch.float64)
    x, target = correlated_inputs(64, 24), torch.randn(64, 16, dtype=torch.float64)
    first0, second0 = plain_factors(weight)
    rebased = whitened_factors(first0, second0, x.T @ x / len(x))

    def grads(first: torch.Tensor, second: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        first, second = first.clone().requires_grad_(), second.clone().requires_grad_()
        ((x @ first.T @ second.T - target) ** 2).sum().backward()
        return first.grad, second.grad

    (g_first0, g_second0), (g_first, g_second) = grads(first0, second0), grads(rebased.first, rebased.second)
    torch.testing.assert_close(carry_state("exp_avg", g_first0, "first", rebased), g_first, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(carry_state("exp_avg", g_second0, "second", rebased), g_second, rtol=1e-7, atol=1e-9)


def test_rebasing_twice_on_the_same_data_changes_nothing_not_even_the_second_moments() -> None:
    torch.manual_seed(4)
    weight = torch.randn(20, 20, dtype=torch.float64)
    x = correlated_inputs(1000, 20)
    moment = x.T @ x / len(x)
    once = whitened_factors(*plain_factors(weight), moment)
    twice = whitened_factors(once.first, once.second, moment)
    torch.testing.assert_close(twice.first.abs(), once.first.abs(), rtol=1e-6, atol=1e-9)  # up to signs
    squares = torch.rand(20, 20, dtype=torch.float64)
    torch.testing.assert_close(carry_state("exp_avg_sq", squares, "first", twice), squares, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(carry_state("exp_avg_sq", squares, "second", twice), squares, rtol=1e-5, atol=1e-9)


def test_carried_second_moments_stay_non_negative_and_unknown_states_are_left_to_the_caller() -> None:
    torch.manual_seed(5)
    weight = torch.randn(12, 18)
    x = correlated_inputs(300, 18).float()
    rebased = whitened_factors(*plain_factors(weight), x.T @ x / len(x))
    squares = torch.rand(12, 18)
    carried = carry_state("exp_avg_sq", squares, "first", rebased)
    assert carried.dtype == squares.dtype and bool((carried >= 0).all())
    assert carry_state("step", torch.tensor(3.0), "first", rebased) is None
    assert carry_state("lion_state", squares, "first", rebased) is None


def test_a_conv_kernel_is_rebased_through_its_flattened_matrix() -> None:
    torch.manual_seed(6)
    conv = nn.Conv2d(3, 8, 3, padding=1)
    layer, _ = LowRankConv2d.from_conv2d(conv)
    images = torch.randn(4, 3, 6, 6)
    rows = layer._input_rows(images)
    rebased = whitened_factors(layer.first.detach().flatten(1), layer.second.detach(), rows.T @ rows / len(rows))
    with torch.no_grad():
        before = layer(images)
        layer.first.copy_(rebased.first.reshape(layer.first.shape))
        layer.second.copy_(rebased.second)
        torch.testing.assert_close(layer(images), before, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("padding", [0, 1, "same", "valid"])
@pytest.mark.parametrize("kernel", [3, 2])
def test_a_convolutions_input_rows_are_the_patches_its_kernel_multiplies(padding: int | str, kernel: int) -> None:
    """The hidden convolution equals the patches times the flattened kernel, so the statistics describe exactly what
    the kernel sees (including PyTorch's one-sided padding of even kernels under ``same``)."""
    torch.manual_seed(7)
    layer, _ = LowRankConv2d.from_conv2d(nn.Conv2d(2, 5, kernel, padding=padding, dilation=1))
    images = torch.randn(3, 2, 7, 7)
    with torch.no_grad():
        hidden = F.conv2d(images, layer.first, None, layer.stride, layer.padding, layer.dilation)
        rows = layer._input_rows(images)
        from_rows = rows @ layer.first.flatten(1).T
    torch.testing.assert_close(from_rows, hidden.movedim(1, -1).reshape(-1, layer.rank), rtol=1e-5, atol=1e-5)


def test_a_layer_feeds_its_statistics_in_training_mode_only() -> None:
    torch.manual_seed(8)
    layer, _ = LowRankLinear.from_linear(nn.Linear(6, 4))
    layer.statistics = LayerStatistics("inputs", 6)
    x = torch.randn(2, 5, 6)
    layer.train()(x)
    layer.eval()(torch.randn(7, 6))  # validation: not counted
    sync([layer.statistics])
    assert layer.statistics.rows == 10
    expected = (x.reshape(-1, 6).T @ x.reshape(-1, 6)).double() / 10  # float64 sums of the float32 products
    torch.testing.assert_close(layer.statistics.mean(), expected)
    layer.statistics = LayerStatistics("hidden", layer.rank)
    layer.train()(x)
    sync([layer.statistics])
    hidden = x.reshape(-1, 6) @ layer.first.detach().T
    torch.testing.assert_close(layer.statistics.mean(), hidden.square().mean(0).double())


def test_statistics_survive_a_state_dict_round_trip_and_keep_adding() -> None:
    stats = LayerStatistics("inputs", 3)
    stats.add(torch.ones(4, 3))
    sync([stats])
    copy = LayerStatistics.from_state_dict(stats.state_dict())
    for s in (stats, copy):
        s.add(2 * torch.ones(1, 3))
        sync([s])
    assert copy.rows == stats.rows == 5 and torch.equal(copy.total, stats.total)
    with pytest.raises(RuntimeError, match="no hidden statistics were gathered"):
        LayerStatistics("hidden", 3).mean()
