"""LowRankRefactoring through the Trainer: factorise at setup, lower the rank on schedule, truncate at fit end."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from digits_fits import fit, whole_and_resumed
from torch import nn

from lightning_compress import LowRankRefactoring
from lightning_compress._lightning import Callback, pl
from lightning_compress.data import DigitsDataModule
from lightning_compress.lowrank import LowRankConv2d, LowRankLinear
from lightning_compress.models import ImageClassifier


class Ranks(Callback):
    """Records each factorised layer's active rank after every optimizer step."""

    def __init__(self) -> None:
        self.rows: list[tuple[int, dict[str, int]]] = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        ranks = {n: m.active_rank for n, m in pl_module.named_modules() if isinstance(m, LowRankLinear | LowRankConv2d)}
        self.rows.append((trainer.global_step, ranks))


class Outputs(Callback):
    """The model's outputs on fixed images when fit ends, before the callbacks listed after this one run."""

    images = torch.randn(32, 1, 8, 8)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        with torch.no_grad():
            self.before = pl_module.eval()(self.images)


def test_factorising_at_setup_leaves_the_model_computing_the_same() -> None:
    pl.seed_everything(0)
    model = ImageClassifier(image_size=8).eval()
    images = torch.randn(16, 1, 8, 8)
    with torch.no_grad():
        before = model(images)
        layers, targets, skipped = LowRankRefactoring(rank_ratio=0.25, end_step=10).prepare(model)
        after = model(images)
    assert sorted(layers) == ["net.conv1", "net.conv2", "net.fc1", "net.fc2"] and not skipped
    assert isinstance(model.net.conv2, LowRankConv2d) and isinstance(model.net.fc1, LowRankLinear)
    assert targets == {"net.conv1": 3, "net.conv2": 16, "net.fc1": 32, "net.fc2": 3}  # ceil(0.25 * full rank)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)


def test_ranks_fall_on_the_schedule_to_the_target_and_the_model_is_truncated_at_fit_end(
    quiet_trainer_kwargs: dict[str, Any],
) -> None:
    ranks, outputs = Ranks(), Outputs()
    lowrank = LowRankRefactoring(rank_ratio=0.25, start_step=10, end_step=30, update_every=5, schedule="linear")
    model = fit(quiet_trainer_kwargs, [outputs, lowrank, ranks], max_steps=40)
    fc1 = dict(ranks.rows)
    full, target = 128, 32
    for step, row in ranks.rows:
        expected = lowrank.scheduled_rank("net.fc1", step) if step >= 10 else full
        assert row["net.fc1"] == expected, step
    assert [fc1[s]["net.fc1"] for s in (9, 10, 15, 20, 25, 30, 40)] == [128, 128, 104, 80, 56, 32, 32]
    steps = sorted(fc1)
    assert all(fc1[a]["net.fc1"] >= fc1[b]["net.fc1"] for a, b in zip(steps, steps[1:], strict=False))
    # fit end: physically truncated to the target ranks
    assert model.net.fc1.first.shape == (target, 64 * 2 * 2) and model.net.fc1.second.shape == (128, target)
    assert model.net.conv2.first.shape[0] == lowrank.target_ranks["net.conv2"]
    with torch.no_grad():  # truncation dropped only switched-off directions: the outputs are those before it
        torch.testing.assert_close(model.eval()(outputs.images), outputs.before, atol=1e-5, rtol=1e-5)


def test_resume_mid_schedule_is_bitwise_exact(tmp_path: Path, quiet_trainer_kwargs: dict[str, Any]) -> None:
    """Stopped at step 19 (the first epoch's last batch) between two rank updates, resumed by a fresh Trainer."""

    def callbacks() -> list[Callback]:
        return [LowRankRefactoring(energy=0.8, start_step=5, end_step=35, update_every=5, truncate_at_fit_end=False)]

    whole, resumed = whole_and_resumed(quiet_trainer_kwargs, tmp_path, callbacks, max_steps=40)
    expected, got = whole.state_dict(), resumed.state_dict()
    assert expected.keys() == got.keys() and any(key.endswith("rank_mask") for key in got)
    assert not bool(expected["net.fc1.rank_mask"].all())  # the ranks did fall
    for key, tensor in expected.items():
        assert torch.equal(got[key], tensor), key


class Trainable(Callback):
    """The number of weights the optimizer trains, and the factor shapes, when training starts."""

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.trained = sum(p.numel() for group in trainer.optimizers[0].param_groups for p in group["params"])
        self.fc1_first = tuple(pl_module.net.fc1.first.shape)


class MaskedOneShot(LowRankRefactoring):
    """The same one-shot cut made the other way: full-rank factors, the rank mask cut at step 0."""

    cuts_at_setup = False


ONE_SHOT = {"rank_ratio": 0.25, "start_step": 0, "end_step": 1, "schedule": "constant"}


def test_a_one_shot_cut_trains_the_smaller_factors_from_the_first_step(quiet_trainer_kwargs: dict[str, Any]) -> None:
    """start_step=0 + constant + rank_ratio: setup factorises at the target ranks, so the optimizer never holds the
    full-rank factors; it trains what the rank-mask route trains (one model, up to float summation order)."""
    small, masked = Trainable(), Trainable()
    lowrank = LowRankRefactoring(**ONE_SHOT)
    assert lowrank.cuts_at_setup
    dense_params = sum(p.numel() for p in ImageClassifier(image_size=8).parameters())
    model = fit(quiet_trainer_kwargs, [lowrank, small], max_steps=12)
    reference = fit(quiet_trainer_kwargs, [MaskedOneShot(**ONE_SHOT), masked], max_steps=12)
    assert small.fc1_first == (32, 256) and masked.fc1_first == (128, 256)  # target rank 32 of 128
    assert small.trained < 0.5 * dense_params < masked.trained
    assert lowrank.target_ranks == {"net.conv1": 3, "net.conv2": 16, "net.fc1": 32, "net.fc2": 3}
    images = torch.randn(32, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(images), reference.eval()(images), atol=1e-4, rtol=1e-4)
    assert model.net.fc1.first.shape == reference.net.fc1.first.shape == (32, 256)  # both truncated at fit end


@pytest.mark.parametrize(
    "kwargs",
    [
        {**ONE_SHOT, "schedule": "cubic", "end_step": 10},
        {**ONE_SHOT, "start_step": 5, "end_step": 6},
        {**ONE_SHOT, "start_step": 5, "end_step": 6, "calibration_steps": 5},
        {"energy": 0.8, "start_step": 0, "end_step": 1, "schedule": "constant"},
    ],
)
def test_a_cut_that_depends_on_training_keeps_the_full_rank_factors_until_it_is_made(kwargs: dict[str, Any]) -> None:
    assert not LowRankRefactoring(**kwargs).cuts_at_setup


def test_a_one_shot_cut_resumes_bitwise(tmp_path: Path, quiet_trainer_kwargs: dict[str, Any]) -> None:
    def callbacks() -> list[Callback]:
        return [LowRankRefactoring(**ONE_SHOT, truncate_at_fit_end=False)]

    whole, resumed = whole_and_resumed(quiet_trainer_kwargs, tmp_path, callbacks, max_steps=24)
    expected, got = whole.state_dict(), resumed.state_dict()
    assert expected.keys() == got.keys() and expected["net.fc1.first"].shape == (32, 256)
    for key, tensor in expected.items():
        assert torch.equal(got[key], tensor), key


def test_the_monitor_logs_fewer_parameters_as_the_rank_falls(quiet_trainer_kwargs: dict[str, Any]) -> None:
    from lightning_compress import CompressionMonitor

    monitor = CompressionMonitor(log_every_n_steps=5, measure_latency=False)
    lowrank = LowRankRefactoring(param_budget=0.3, start_step=0, end_step=10, update_every=5)
    fit(quiet_trainer_kwargs, [lowrank, monitor], max_steps=12)
    assert monitor.dense is not None and monitor.report is not None
    dense, final = monitor.dense, monitor.report
    assert final.params_effective < 0.45 * dense.params_effective  # the factorised layers keep 30 % (+ biases)
    assert final.bytes_compressed < 0.45 * dense.bytes_compressed
    ranks = {layer.name: layer.figures.rank for layer in final.layers if layer.figures.rank is not None}
    assert ranks == lowrank.target_ranks and ranks


def test_a_layer_that_would_not_get_smaller_stays_dense_and_says_why() -> None:
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4), nn.ReLU(), nn.Linear(4, 4))
    layers, targets, skipped = LowRankRefactoring(rank_ratio=0.4, end_step=10).prepare(model)
    assert list(layers) == ["0", "2"] and targets == {"0": 26, "2": 2}
    assert skipped == {
        "4": "its target rank 2 would hold 16 weights in two factors, against 16 dense: not `min_saving`=0.1 fewer"
    }
    assert type(model[4]) is nn.Linear


def test_a_global_budget_is_kept_and_every_layer_keeps_about_the_same_share_of_its_spectrum() -> None:
    """Layer 1 is rank 4 plus a little noise, layer 0 a random (spread) spectrum. 16 directions fit the budget; equal
    shares give the spread layer 14 (57 % of its energy) and the concentrated one 2 (64 %): the worst layer keeps more
    than under any other split (12 + 4 would leave layer 0 at 51 %)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64))
    with torch.no_grad():
        model[1].weight.copy_(torch.randn(64, 4) @ torch.randn(4, 64) + 0.01 * torch.randn(64, 64))
    shares = {}
    for name in ("0", "1"):
        squares = torch.linalg.svdvals(model.get_submodule(name).weight.detach().double()).square()
        shares[name] = torch.cumsum(squares, 0) / squares.sum()
    _, targets, _ = LowRankRefactoring(param_budget=0.25, end_step=10).prepare(model)
    assert sum(rank * 128 for rank in targets.values()) <= 0.25 * 2 * 64 * 64
    assert targets == {"0": 14, "1": 2}
    kept = {name: float(shares[name][rank - 1]) for name, rank in targets.items()}
    assert min(kept.values()) > 0.56 and min(kept.values()) > float(shares["0"][12 - 1])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"end_step": 10}, r"Give exactly one of `rank_ratio`, `energy` and `param_budget`; got rank_ratio=None"),
        ({"rank_ratio": 0.5, "energy": 0.9, "end_step": 10}, r"Give exactly one of .*rank_ratio=0.5, energy=0.9"),
        ({"rank_ratio": 0.0, "end_step": 10}, r"`rank_ratio` must be a number in \(0, 1\]; got 0.0"),
        ({"energy": 1.5, "end_step": 10}, r"`energy` must be a number in \(0, 1\]; got 1.5"),
        ({"param_budget": True, "end_step": 10}, r"`param_budget` must be a number in \(0, 1\]; got True"),
        ({"rank_ratio": 0.5}, r"`end_step` must be an integer step after `start_step`=0; got None"),
        ({"rank_ratio": 0.5, "start_step": 10, "end_step": 10}, r"`end_step` must be greater than `start_step`"),
        ({"rank_ratio": 0.5, "end_step": 10, "schedule": "fast"}, r"`schedule` must be one of cubic, linear"),
        ({"rank_ratio": 0.5, "end_step": 10, "update_every": 0}, r"`update_every` must be an integer >= 1; got 0"),
        ({"rank_ratio": 0.5, "end_step": 10, "min_saving": 1.0}, r"`min_saving` must be a number in \[0, 1\); got 1.0"),
    ],
)
def test_bad_arguments_are_refused_at_construction(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LowRankRefactoring(**kwargs)


def test_a_budget_no_layer_can_meet_is_refused_before_any_step(quiet_trainer_kwargs: dict[str, Any]) -> None:
    model = ImageClassifier(image_size=8)
    trainer = pl.Trainer(
        max_steps=2, callbacks=[LowRankRefactoring(param_budget=0.001, end_step=2)], **quiet_trainer_kwargs
    )
    with pytest.raises(ValueError, match=r"`param_budget`=0.001 allows .* but rank 1 in every targeted layer"):
        trainer.fit(model, datamodule=DigitsDataModule())
    assert type(model.net.fc1) is nn.Linear  # nothing was half-applied


def test_a_target_that_saves_nothing_anywhere_is_refused() -> None:
    model = nn.Sequential(nn.Linear(8, 8))
    with pytest.raises(ValueError, match=r"would make no layer of Sequential smaller with `rank_ratio`=0.9"):
        LowRankRefactoring(rank_ratio=0.9, end_step=10).prepare(model)
    assert type(model[0]) is nn.Linear


def test_include_matching_nothing_is_refused() -> None:
    types = "Linear/Conv2d/transformers Conv1D"
    with pytest.raises(ValueError, match=rf"`include` pattern 'net.fc9' matches no {types} module"):
        LowRankRefactoring(rank_ratio=0.5, end_step=10, include=["net.fc9"]).prepare(ImageClassifier(image_size=8))


def test_two_instances_that_differ_only_in_exclude_coexist_and_resume(
    tmp_path: Path, quiet_trainer_kwargs: dict[str, Any]
) -> None:
    """One factorises the convolutions, the other the Linears: their checkpoint states must not collide."""

    def callbacks() -> list[Callback]:
        settings = {"rank_ratio": 0.5, "start_step": 5, "end_step": 35, "update_every": 5, "truncate_at_fit_end": False}
        return [
            LowRankRefactoring(**settings, exclude=[r"net\.fc\d"]),
            LowRankRefactoring(**settings, exclude=[r"net\.conv\d"]),
        ]

    convs, linears = callbacks()
    assert convs.state_key != linears.state_key
    whole, resumed = whole_and_resumed(quiet_trainer_kwargs, tmp_path, callbacks, max_steps=40)
    assert isinstance(whole.net.conv2, LowRankConv2d) and isinstance(whole.net.fc1, LowRankLinear)
    checkpoint = torch.load(tmp_path / "step=19.ckpt", weights_only=False)["callbacks"]
    assert checkpoint[convs.state_key]["target_ranks"] == {"net.conv1": 5, "net.conv2": 32}
    assert checkpoint[linears.state_key]["target_ranks"] == {"net.fc1": 64, "net.fc2": 5}
    expected, got = whole.state_dict(), resumed.state_dict()
    assert expected.keys() == got.keys()
    assert not bool(expected["net.fc1.rank_mask"].all()) and not bool(expected["net.conv2.rank_mask"].all())
    for key, tensor in expected.items():
        assert torch.equal(got[key], tensor), key
