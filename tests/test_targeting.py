"""Targeting: which modules a technique acts on, by layer type and whole-name regular expressions."""

from __future__ import annotations

import pytest
from torch import nn

from lightning_compress.targeting import WEIGHTED_LAYERS, Targeting


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 4)
        self.fc10 = nn.Linear(4, 4)
        self.encoder = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv1d(4, 4, 1), nn.Conv3d(1, 2, 1))
        self.norm = nn.LayerNorm(4)
        self.embed = nn.Embedding(10, 4)
        self.head = nn.Linear(4, 2)


def select(include: list[str] | None = None, exclude: list[str] | None = None) -> list[str]:
    return list(Targeting.from_arguments(include, exclude).select(Net()))


def test_default_selects_every_weighted_layer_in_module_order() -> None:
    assert select() == ["fc1", "fc10", "encoder.0", "encoder.2", "encoder.3", "head"]
    assert set(WEIGHTED_LAYERS) == {nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d}


def test_include_uses_fullmatch_so_fc1_does_not_select_fc10() -> None:
    assert select(["fc1"]) == ["fc1"]
    assert select(["fc10"]) == ["fc10"]
    assert select([r"fc\d+"]) == ["fc1", "fc10"]
    assert select([r"encoder\..*"]) == ["encoder.0", "encoder.2", "encoder.3"]


def test_several_include_patterns_are_a_union() -> None:
    assert select(["head", "fc1"]) == ["fc1", "head"]  # module order, not pattern order


def test_exclude_uses_fullmatch_and_wins_over_include() -> None:
    assert select(exclude=["fc1"]) == ["fc10", "encoder.0", "encoder.2", "encoder.3", "head"]
    assert select(exclude=["head", r"encoder\..*"]) == ["fc1", "fc10"]
    assert select(include=[r"fc\d+"], exclude=["fc10"]) == ["fc1"]


def test_an_exclude_pattern_that_matches_nothing_is_harmless() -> None:
    assert select(exclude=["nothing"]) == select()


def test_unsupported_types_are_never_selected_even_when_named() -> None:
    assert select(exclude=["norm", "embed"]) == select()
    with pytest.raises(ValueError, match=r"`include` pattern 'norm' matches no"):
        select(["norm"])


def test_an_include_pattern_that_matches_nothing_raises_naming_it_and_listing_candidates() -> None:
    with pytest.raises(ValueError) as info:
        select(["fc1", "fc"])
    message = str(info.value)
    assert "`include` pattern 'fc' matches no Linear/Conv1d/Conv2d/Conv3d module of Net" in message
    assert "Candidates: fc1, fc10, encoder.0, encoder.2, encoder.3, head" in message
    assert "HINT" in message and "re.fullmatch" in message


def test_a_prefix_without_wildcard_matches_nothing_and_says_why() -> None:
    with pytest.raises(ValueError, match=r"`include` pattern 'encoder' matches no .* HINT: .*'\.\*' for a prefix"):
        select(["encoder"])


def test_nothing_left_after_exclude_raises() -> None:
    with pytest.raises(ValueError, match=r"No module of Net is left to compress"):
        select(include=["fc1"], exclude=["fc.*"])


@pytest.mark.parametrize("argument", ["include", "exclude"])
def test_an_invalid_regex_raises_at_construction_naming_the_argument(argument: str) -> None:
    with pytest.raises(ValueError, match=rf"`{argument}` holds an invalid regular expression 'fc\[1': "):
        Targeting.from_arguments(**{"include": None, "exclude": None, argument: ["fc1", "fc[1"]})


@pytest.mark.parametrize("argument", ["include", "exclude"])
def test_a_single_string_instead_of_a_list_raises_with_a_hint(argument: str) -> None:
    with pytest.raises(ValueError) as info:
        Targeting.from_arguments(**{"include": None, "exclude": None, argument: "fc1"})
    message = str(info.value)
    assert f"`{argument}` must be a list of regular expressions, got 'fc1'." in message
    assert f'HINT: write {argument}=["fc1"]' in message


def test_non_string_items_raise() -> None:
    with pytest.raises(ValueError, match=r"`include` must be a list of regular expressions, got \['fc1', 3\]"):
        Targeting.from_arguments(["fc1", 3], None)  # type: ignore[list-item]


def test_layer_types_can_be_narrowed() -> None:
    targeting = Targeting.from_arguments(None, None, layer_types=(nn.Linear,))
    assert list(targeting.select(Net())) == ["fc1", "fc10", "head"]


def test_select_returns_the_modules_themselves() -> None:
    net = Net()
    chosen = Targeting.from_arguments(["head"], None).select(net)
    assert chosen["head"] is net.head
