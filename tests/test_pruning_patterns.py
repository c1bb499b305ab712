"""Pruning patterns: exact masks (True = keep) for a sparsity, for unstructured, channel and N:M pruning."""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import pytest
import torch
from digits_fits import fit
from torch import nn

from lightning_compress import GradualPruning
from lightning_compress.pruning.patterns import (
    NM,
    PATTERNS,
    Channel,
    Pattern,
    Scope,
    Unstructured,
    compute_masks,
    lowest_in_scope,
    register_pattern,
)
from lightning_compress.pruning.scoring import PRUNED, magnitude, row_norms

UNSTRUCTURED = Pattern.parse("unstructured")
CHANNEL = Pattern.parse("channel")


def weights_of(*modules: nn.Module) -> dict[str, torch.Tensor]:
    return {f"layer{i}.weight": m.weight.detach().clone() for i, m in enumerate(modules)}


def some_weights(seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return weights_of(nn.Linear(64, 32), nn.Conv2d(16, 24, 3), nn.Linear(32, 10), nn.Conv1d(8, 12, 5))


def pruned_fraction(masks: dict[str, torch.Tensor]) -> float:
    return sum(int((~m).sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())


def assert_n_m(weight: torch.Tensor, n: int, m: int) -> None:
    """EXHAUSTIVE: every group of m consecutive weights along the input dimension has at most n non-zeros."""
    out_features, in_features = weight.shape[:2]
    assert in_features % m == 0
    for row in range(out_features):
        for position in itertools.product(*(range(k) for k in weight.shape[2:])):
            for start in range(0, in_features, m):
                group = weight[(row, slice(start, start + m), *position)]
                assert group.shape == (m,)
                assert int((group != 0).sum()) <= n, (row, position, start, group)


# ------------------------------------------------------------------------------------------------ Pattern.parse


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("unstructured", Unstructured()),
        ("channel", Channel()),
        ("2:4", NM(2, 4)),
        ("1:4", NM(1, 4)),
        ("4:8", NM(4, 8)),
    ],
)
def test_parse_accepts_the_documented_patterns(text: str, expected: Pattern) -> None:
    assert Pattern.parse(text) == expected
    assert str(Pattern.parse(text)) == text


def test_only_n_m_fixes_the_sparsity() -> None:
    assert Pattern.parse("2:4").fixed_sparsity == 0.5
    assert Pattern.parse("1:4").fixed_sparsity == 0.75
    assert Pattern.parse("unstructured").fixed_sparsity is None
    assert Pattern.parse("channel").fixed_sparsity is None


@pytest.mark.parametrize("text", ["2:2", "4:2", "0:4"])
def test_parse_rejects_n_not_below_m_or_zero(text: str) -> None:
    with pytest.raises(
        ValueError, match=rf"`pattern` '{text}' keeps N=\d+ of every M=\d+ weights: N must satisfy 1 <= N < M"
    ):
        Pattern.parse(text)


@pytest.mark.parametrize("text", ["foo", "2-4", "random", "", "2:4:8", "Channel"])
def test_parse_rejects_unknown_patterns_listing_the_valid_ones(text: str) -> None:
    with pytest.raises(ValueError, match=r"`pattern` must be 'unstructured', 'channel' or 'N:M' such as '2:4'; got"):
        Pattern.parse(text)


# ------------------------------------------------------------------------------------------------ scoring


def test_scores_put_pruned_entries_below_every_live_one() -> None:
    weight = torch.tensor([[0.0, -2.0], [3.0, 0.5]])
    mask = torch.tensor([[True, False], [True, True]])
    assert torch.equal(magnitude(weight, mask), torch.tensor([[0.0, PRUNED], [3.0, 0.5]]))
    assert torch.equal(row_norms(weight, torch.tensor([[False, False], [True, True]]))[0], torch.tensor(PRUNED))


# ------------------------------------------------------------------------------------------------ unstructured


@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.5, 0.9, 0.99])
def test_unstructured_global_prunes_exactly_the_target_share(sparsity: float) -> None:
    weights = some_weights()
    masks = compute_masks(UNSTRUCTURED, "global", sparsity, weights, {})
    assert set(masks) == set(weights)
    for name, mask in masks.items():
        assert mask.dtype == torch.bool and mask.shape == weights[name].shape
    assert pruned_fraction(masks) == pytest.approx(sparsity, abs=0.005)
    total = sum(w.numel() for w in weights.values())
    assert sum(int((~m).sum()) for m in masks.values()) == round(sparsity * total)


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.9, 0.99])
def test_unstructured_layer_prunes_every_layer_to_the_target(sparsity: float) -> None:
    weights = some_weights()
    masks = compute_masks(UNSTRUCTURED, "layer", sparsity, weights, {})
    for name, mask in masks.items():
        assert int((~mask).sum()) == round(sparsity * mask.numel()), name
        assert float((~mask).float().mean()) == pytest.approx(sparsity, abs=0.005)


def test_unstructured_prunes_the_smallest_magnitudes() -> None:
    weights = some_weights()
    masks = compute_masks(UNSTRUCTURED, "global", 0.6, weights, {})
    kept = torch.cat([weights[n][masks[n]].abs() for n in weights])
    pruned = torch.cat([weights[n][~masks[n]].abs() for n in weights])
    assert pruned.max() <= kept.min()


def test_global_scope_ranks_across_layers_so_a_layer_of_tiny_weights_goes_first() -> None:
    torch.manual_seed(0)
    big, tiny = nn.Linear(40, 40), nn.Linear(40, 10)  # 1,600 and 400 weights
    with torch.no_grad():
        big.weight.copy_(big.weight.sign() * (0.1 + big.weight.abs()))  # every |w| >= 0.1
        tiny.weight.mul_(0.5)  # every |w| < 0.08 (Linear(40, .) initialises within 1/sqrt(40) = 0.158)
    weights = weights_of(big, tiny)
    global_masks = compute_masks(UNSTRUCTURED, "global", 0.2, weights, {})  # 400 weights: all of the tiny layer
    assert not global_masks["layer1.weight"].any()
    assert global_masks["layer0.weight"].all()
    layer_masks = compute_masks(UNSTRUCTURED, "layer", 0.2, weights, {})
    assert float((~layer_masks["layer1.weight"]).float().mean()) == pytest.approx(0.2)
    assert float((~layer_masks["layer0.weight"]).float().mean()) == pytest.approx(0.2)


def test_compute_masks_does_not_modify_its_inputs() -> None:
    weights = some_weights()
    before = {n: w.clone() for n, w in weights.items()}
    previous = compute_masks(UNSTRUCTURED, "global", 0.3, weights, {})
    previous_copy = {n: m.clone() for n, m in previous.items()}
    compute_masks(UNSTRUCTURED, "global", 0.6, weights, previous)
    assert all(torch.equal(before[n], weights[n]) for n in weights)
    assert all(torch.equal(previous_copy[n], previous[n]) for n in previous)


# ------------------------------------------------------------------------------------------------ monotone masks


@pytest.mark.parametrize(
    ("pattern", "scope", "steps"),
    [
        ("unstructured", "global", (0.2, 0.5, 0.8, 0.95)),
        ("unstructured", "layer", (0.2, 0.5, 0.8, 0.95)),
        ("channel", "layer", (0.2, 0.5, 0.8)),
        ("2:4", "global", (0.1, 0.3, 0.5)),
        ("2:4", "layer", (0.1, 0.3, 0.5)),
        ("1:4", "global", (0.2, 0.5, 0.75)),
    ],
)
def test_a_later_call_with_the_previous_masks_never_revives_a_pruned_weight(
    pattern: str, scope: str, steps: tuple[float, ...]
) -> None:
    weights = {n: w for n, w in some_weights().items() if w.shape[1] % 4 == 0}
    masks: dict[str, torch.Tensor] = {}
    generator = torch.Generator().manual_seed(1)
    for sparsity in steps:
        # Training moves the weights between updates: pruned ones are zero, live ones drift, some to larger values.
        weights = {
            n: (w * masks[n] if n in masks else w)
            + 0.5 * torch.randn(w.shape, generator=generator) * (masks.get(n, True))
            for n, w in weights.items()
        }
        new = compute_masks(Pattern.parse(pattern), scope, sparsity, weights, masks)
        for name, mask in masks.items():
            assert not (new[name] & ~mask).any(), f"{name} revived weights at sparsity {sparsity}"
        masks = new
        assert pruned_fraction(masks) == pytest.approx(sparsity, abs=0.02)


def test_the_same_sparsity_again_leaves_the_masks_unchanged_even_if_weights_moved() -> None:
    weights = some_weights()
    masks = compute_masks(UNSTRUCTURED, "global", 0.7, weights, {})
    moved = {n: w * m + torch.randn_like(w) for n, w, m in ((n, weights[n], masks[n]) for n in weights)}
    again = compute_masks(UNSTRUCTURED, "global", 0.7, moved, masks)
    assert all(torch.equal(again[n], masks[n]) for n in masks)


# ------------------------------------------------------------------------------------------------ channel


@pytest.mark.parametrize("sparsity", [0.25, 0.5, 0.9])
def test_channel_prunes_whole_output_rows_with_the_smallest_norms(sparsity: float) -> None:
    weights = some_weights()
    masks = compute_masks(CHANNEL, "layer", sparsity, weights, {})
    for name, mask in masks.items():
        rows = mask.flatten(1)
        assert (rows.all(dim=1) | ~rows.any(dim=1)).all(), f"{name}: a row is partly pruned"
        dead = ~rows.any(dim=1)
        assert int(dead.sum()) == round(sparsity * rows.shape[0])
        norms = weights[name].flatten(1).norm(dim=1)
        if dead.any() and (~dead).any():
            assert norms[dead].max() <= norms[~dead].min()
        zeroed = weights[name] * mask
        assert (zeroed.flatten(1)[dead] == 0).all()


# ------------------------------------------------------------------------------------------------ N:M


@pytest.mark.parametrize("text", ["2:4", "1:4", "4:8"])
@pytest.mark.parametrize("scope", ["global", "layer"])
def test_n_m_at_full_sparsity_holds_in_every_group_of_linear_and_conv(text: str, scope: str) -> None:
    pattern = Pattern.parse(text)
    torch.manual_seed(0)
    layers = {"linear": nn.Linear(32, 6), "conv": nn.Conv2d(16, 5, 3), "conv1d": nn.Conv1d(8, 3, 2)}
    weights = {name: m.weight.detach().clone() for name, m in layers.items()}
    masks = compute_masks(pattern, scope, pattern.fixed_sparsity, weights, {})
    for name, weight in weights.items():
        mask = masks[name]
        assert mask.shape == weight.shape
        assert_n_m(weight * mask, pattern.n, pattern.m)
        # exactly N kept per group: not more pruning than the pattern asks for
        assert int(mask.sum()) == weight.numel() * pattern.n // pattern.m
    assert pruned_fraction(masks) == pytest.approx(pattern.fixed_sparsity)


def test_n_m_keeps_the_largest_n_of_each_group() -> None:
    weight = torch.tensor([[0.1, -0.9, 0.5, 0.2, 4.0, 3.0, -2.0, 1.0]])
    mask = compute_masks(Pattern.parse("2:4"), "layer", 0.5, {"w": weight}, {})["w"]
    assert mask.tolist() == [[False, True, True, False, True, True, False, False]]


def test_n_m_groups_run_along_input_channels_of_a_conv_at_each_kernel_position() -> None:
    torch.manual_seed(0)
    weight = torch.randn(2, 8, 3, 3)
    mask = compute_masks(Pattern.parse("2:4"), "layer", 0.5, {"w": weight}, {})["w"]
    kept_per_group = mask.view(2, 2, 4, 3, 3).sum(dim=2)  # input channels 0-3 and 4-7 at every (row, kh, kw)
    assert (kept_per_group == 2).all()
    for row, kh, kw, group in itertools.product(range(2), range(3), range(3), range(2)):
        channels = slice(4 * group, 4 * group + 4)
        kept = weight[row, channels, kh, kw].abs()[mask[row, channels, kh, kw]]
        dropped = weight[row, channels, kh, kw].abs()[~mask[row, channels, kh, kw]]
        assert dropped.max() <= kept.min()


@pytest.mark.parametrize("text", ["2:4", "1:4", "4:8"])
@pytest.mark.parametrize("scope", ["global", "layer"])
def test_partial_n_m_prunes_some_groups_to_n_m_and_leaves_the_others_dense(text: str, scope: str) -> None:
    pattern = Pattern.parse(text)
    torch.manual_seed(0)
    weights = {"linear": torch.randn(16, 32), "conv": torch.randn(8, 16, 3, 3)}
    sparsity = 0.4 * pattern.fixed_sparsity  # below 1 - N/M: 40 % of the groups become N:M
    masks = compute_masks(pattern, scope, sparsity, weights, {})
    pruned_groups = dense_groups = 0
    for name, weight in weights.items():
        moved = masks[name].movedim(1, -1) if weight.dim() > 2 else masks[name]
        kept = moved.reshape(-1, pattern.m).sum(dim=1)
        assert ((kept == pattern.n) | (kept == pattern.m)).all(), f"{name}: a group is neither N:M nor dense"
        pruned_groups += int((kept == pattern.n).sum())
        dense_groups += int((kept == pattern.m).sum())
        assert_n_m(weight * masks[name], pattern.m, pattern.m)  # trivially true; shapes line up
    total = pruned_groups + dense_groups
    assert pruned_groups == pytest.approx(0.4 * total, abs=1 if scope == "global" else 2)
    assert 0 < pruned_groups < total
    assert pruned_fraction(masks) == pytest.approx(sparsity, abs=0.01)


def test_partial_n_m_chooses_the_groups_that_lose_least_first() -> None:
    weight = torch.tensor([[5.0, 5.0, 5.0, 5.0, 1.0, 1.0, 0.01, 0.02]])  # second group loses 0.03, the first 10
    mask = compute_masks(Pattern.parse("2:4"), "layer", 0.25, {"w": weight}, {})["w"]
    assert mask.tolist() == [[True, True, True, True, True, True, False, False]]


def test_a_yaml_base_60_pattern_gets_a_hint_to_quote_it() -> None:
    with pytest.raises(ValueError, match=r"got 124\. HINT: YAML reads an unquoted N:M as a base-60 number"):
        Pattern.parse(124)  # what YAML 1.1 makes of an unquoted 2:4


# ------------------------------------------------------------------------------------------------ registry


@dataclass(frozen=True)
class Blocks(Pattern):
    """A user's pattern, written in this file alone: whole blocks of 4 consecutive input weights, by L1 norm."""

    name: ClassVar[str] = "blocks4"

    def check_layer(self, name: str, module_type: str, weight_shape: torch.Size) -> None:
        if weight_shape[1] % 4:
            raise ValueError(f"{name} has {weight_shape[1]} inputs, not a multiple of 4")

    def masks(
        self, scope: Scope, sparsity: float, weights: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        blocks = {
            n: magnitude(w, masks.get(n)).reshape(w.shape[0], -1, 4).sum(-1).flatten() for n, w in weights.items()
        }
        pruned = lowest_in_scope(blocks, sparsity, scope)
        return {
            n: ~pruned[n].view(w.shape[0], -1, 1).expand(w.shape[0], -1, 4).reshape(w.shape) for n, w in weights.items()
        }


@pytest.fixture
def blocks_registered() -> Iterator[type[Pattern]]:
    register_pattern(Blocks)
    yield Blocks
    PATTERNS.pop(Blocks.name)


def test_a_pattern_registered_from_another_file_prunes_through_gradual_pruning(
    blocks_registered: type[Pattern], quiet_trainer_kwargs: dict[str, Any]
) -> None:
    assert isinstance(Pattern.parse("blocks4"), Blocks)
    pruning = GradualPruning(0.5, end_step=10, update_every=5, pattern="blocks4", include=[r"net\.fc\d"])
    model = fit(quiet_trainer_kwargs, [pruning], max_steps=12)
    for layer in (model.net.fc1, model.net.fc2):
        blocks = layer.weight.detach().reshape(layer.weight.shape[0], -1, 4)
        zero_blocks = (blocks == 0).all(-1)
        assert ((blocks != 0).all(-1) | zero_blocks).all()  # every block is whole: all zero or all kept
    assert pruning.sparsity() == pytest.approx(0.5, abs=0.01)
    assert str(pruning.pattern) == "blocks4" and "blocks4" in pruning.state_key


def test_an_unknown_pattern_lists_the_registered_ones_too(blocks_registered: type[Pattern]) -> None:
    with pytest.raises(ValueError, match=r"`pattern` must be 'unstructured', 'channel', 'N:M' such as '2:4' or"
                       r" 'blocks4'; got 'blocks8'"):  # fmt: skip
        GradualPruning(0.5, end_step=10, pattern="blocks8")


def test_a_registered_pattern_refuses_a_layer_it_cannot_prune_before_any_step(
    blocks_registered: type[Pattern], quiet_trainer_kwargs: dict[str, Any]
) -> None:
    pruning = GradualPruning(0.5, end_step=10, pattern="blocks4", include=[r"net\.conv1"])  # 1 input channel
    with pytest.raises(ValueError, match=r"net\.conv1 has 1 inputs, not a multiple of 4"):
        fit(quiet_trainer_kwargs, [pruning], max_steps=2)


def test_a_pattern_name_cannot_be_registered_twice() -> None:
    with pytest.raises(ValueError, match=r"pattern name 'channel' is empty or already registered"):
        register_pattern(Channel)
