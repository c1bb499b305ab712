"""Activation-aware LowRankRefactoring (``calibration_steps``) through the Trainer: statistics gathered before
``start_step``, an exact rebase on the whitened SVD, components judged by their outputs, resumable everywhere."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from digits_fits import fit, whole_and_resumed
from torch import nn

from lightning_compress import LowRankRefactoring
from lightning_compress._lightning import Callback, pl
from lightning_compress.data import DigitsDataModule
from lightning_compress.lowrank import LowRankConv2d, LowRankLinear
from lightning_compress.lowrank.statistics import sync
from lightning_compress.models import ImageClassifier

FACTORISED = ("net.conv1", "net.conv2", "net.fc1", "net.fc2")


class Snapshot(Callback):
    """At ``on_train_batch_end`` of ``step``: the model's eval-mode logits on fixed validation images and its
    active ranks. Callbacks run in list order, so one placed before LowRankRefactoring sees the step before it acts
    and one placed after sees what it did."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.logits: torch.Tensor | None = None
        self.ranks: dict[str, int] = {}

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if trainer.global_step != self.step or self.logits is not None:
            return
        images = trainer.datamodule.val_set.tensors[0][:128]
        was_training = pl_module.training
        with torch.no_grad():
            self.logits = pl_module.eval()(images)
        pl_module.train(was_training)
        self.ranks = {
            n: m.active_rank for n, m in pl_module.named_modules() if isinstance(m, LowRankLinear | LowRankConv2d)
        }


def test_the_rebase_at_start_step_leaves_the_model_computing_the_same(quiet_trainer_kwargs: dict[str, Any]) -> None:
    """Step 12: the factors change basis (rebased on 8 steps of input statistics), the function they compute does
    not; the schedule starts at full rank, so nothing is switched off yet."""
    before, after = Snapshot(12), Snapshot(12)
    lowrank = LowRankRefactoring(rank_ratio=0.25, start_step=12, end_step=30, update_every=6, calibration_steps=8)
    model_first = {}

    class FirstFactor(Callback):
        def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
            if trainer.global_step in (11, 12):
                model_first[trainer.global_step] = pl_module.net.fc1.first.detach().clone()

    fit(quiet_trainer_kwargs, [before, lowrank, after, FirstFactor()], max_steps=13)
    assert lowrank.rebased and before.logits is not None and after.logits is not None
    torch.testing.assert_close(after.logits, before.logits, rtol=1e-4, atol=1e-4)
    assert after.ranks == {name: full for name, full in lowrank.full_ranks.items()}
    step = model_first[12] - model_first[11]  # one Adam step would move fc1 by about lr = 1e-3 per element
    assert float(step.abs().max()) > 0.05, "the factors were not rebased"


def test_one_shot_activation_aware_truncation_loses_much_less_than_truncating_by_the_weights(
    quiet_trainer_kwargs: dict[str, Any],
) -> None:
    """Both runs are bitwise the same up to step 19 (gathering statistics does not touch training); there each
    layer drops to a quarter of its rank at once. Ranked by the data, the logits move far less."""
    errors = {}
    for calibration in (0, 8):
        before, after = Snapshot(19), Snapshot(19)
        lowrank = LowRankRefactoring(
            rank_ratio=0.25, start_step=19, end_step=20, schedule="constant", calibration_steps=calibration
        )
        fit(quiet_trainer_kwargs, [before, lowrank, after], max_steps=19)
        assert after.ranks == lowrank.target_ranks
        errors[calibration] = float((after.logits - before.logits).norm() / before.logits.norm())
    assert errors[8] < 0.6 * errors[0], errors


def test_energy_targets_are_chosen_from_the_whitened_spectra_and_reached(quiet_trainer_kwargs: dict[str, Any]) -> None:
    end = Snapshot(30)
    lowrank = LowRankRefactoring(energy=0.95, start_step=10, end_step=30, update_every=5, calibration_steps=6)
    model = fit(quiet_trainer_kwargs, [lowrank, end], max_steps=32)
    assert set(lowrank.target_ranks) | set(lowrank.skipped) == set(FACTORISED)
    assert lowrank.target_ranks and all(r >= 1 for r in lowrank.target_ranks.values())
    assert end.ranks == {name: rank for name, rank in lowrank.target_ranks.items() if name in end.ranks}
    for name, rank in lowrank.target_ranks.items():  # truncated at fit end, or dense again where nothing is saved
        layer = model.get_submodule(name)
        assert (
            (layer.rank == rank)
            if isinstance(layer, LowRankLinear | LowRankConv2d)
            else rank == lowrank.full_ranks[name]
        )


def test_a_layer_whose_data_target_saves_nothing_keeps_full_rank_and_is_dense_again_at_fit_end(
    quiet_trainer_kwargs: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    """energy=1.0 needs every direction: no layer can be smaller, which only the data can tell (at start_step)."""
    after = Snapshot(8)
    lowrank = LowRankRefactoring(energy=1.0, start_step=4, end_step=8, update_every=2, calibration_steps=4)
    model = fit(quiet_trainer_kwargs, [lowrank, after], max_steps=10)
    assert lowrank.target_ranks == lowrank.full_ranks
    assert type(model.net.fc1) is nn.Linear and type(model.net.conv2) is nn.Conv2d
    assert not [m for m in model.modules() if isinstance(m, LowRankLinear | LowRankConv2d)]
    assert "net.fc1 keeps its full rank and is made dense again at truncation" in caplog.text
    assert "net.fc1 is made dense again: 128 active components hold 49,152 weights against 32,768" in caplog.text


def test_the_statistics_are_in_a_checkpoint_only_while_they_are_gathered(tmp_path: Path, quiet_trainer_kwargs) -> None:
    from pytorch_lightning.callbacks import ModelCheckpoint

    lowrank = LowRankRefactoring(rank_ratio=0.5, start_step=22, end_step=30, calibration_steps=6)
    saver = ModelCheckpoint(tmp_path, "{step}", every_n_train_steps=19, save_top_k=-1)
    fit({**quiet_trainer_kwargs, "enable_checkpointing": True}, [lowrank, saver], max_steps=38)
    states = {}
    for step in (19, 38):
        [state] = [v for k, v in torch.load(tmp_path / f"step={step}.ckpt", weights_only=False)["callbacks"].items()
                   if k.startswith("LowRankRefactoring")]  # fmt: skip
        states[step] = state
    in_window = states[19]
    assert in_window["rebased"] is False and set(in_window["statistics"]) == set(FACTORISED)
    fc1 = in_window["statistics"]["net.fc1"]
    assert (
        fc1["kind"] == "inputs" and fc1["total"].shape == (256, 256) and fc1["rows"] == 64 + 64 + 16
    )  # steps 17-19; 19 ends the epoch: 16 images
    assert states[38]["rebased"] is True and states[38]["statistics"] == {}  # past end_step: nothing gathered


@pytest.mark.parametrize(
    ("start_step", "where"),
    [(22, "mid-calibration: input statistics of steps 17-19 in the checkpoint"),
     (12, "mid-ramp: rebased at 12, hidden-component energy since the update at 18 in the checkpoint")],
)  # fmt: skip
def test_a_run_resumed_mid_calibration_or_mid_ramp_ends_bitwise_equal(
    start_step: int, where: str, tmp_path: Path, quiet_trainer_kwargs: dict[str, Any]
) -> None:
    def callbacks() -> list[Callback]:
        return [LowRankRefactoring(rank_ratio=0.25, start_step=start_step, end_step=34, update_every=6,
                                   calibration_steps=6, truncate_at_fit_end=False)]  # fmt: skip

    whole, resumed = whole_and_resumed(quiet_trainer_kwargs, tmp_path, callbacks, max_steps=40)
    expected, got = whole.state_dict(), resumed.state_dict()
    assert expected.keys() == got.keys()
    assert not bool(expected["net.fc1.rank_mask"].all()), where
    for key, tensor in expected.items():
        assert torch.equal(got[key], tensor), f"{where}: {key}"


def test_without_a_trainer_the_rebase_carries_adam_moments_and_keeps_the_outputs() -> None:
    """The rebase by hand (what the callback does at start_step): same outputs, and Adam's first moment becomes the
    average of the gradients the new factors would have had."""
    pl.seed_everything(0)
    data = DigitsDataModule()
    data.setup("fit")
    model = ImageClassifier(image_size=8)
    lowrank = LowRankRefactoring(rank_ratio=0.5, start_step=3, end_step=9, calibration_steps=3)
    lowrank.setup(SimpleNamespace(), model, "fit")  # type: ignore[arg-type]
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    images, labels = data.train_set.tensors[0][:96], data.train_set.tensors[1][:96]
    lowrank._observe(0)
    for batch in range(3):
        optimizer.zero_grad()
        part = slice(32 * batch, 32 * batch + 32)
        nn.functional.cross_entropy(model(images[part]), labels[part]).backward()
        optimizer.step()
        sync(list(lowrank.statistics.values()))
    model.eval()
    with torch.no_grad():
        before = model(images)
    fc1 = model.net.fc1
    old_avg = optimizer.state[fc1.second]["exp_avg"].clone()
    lowrank._rebase(SimpleNamespace(optimizers=[optimizer]))  # type: ignore[arg-type]
    with torch.no_grad():
        torch.testing.assert_close(model(images), before, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(optimizer.state[fc1.second]["exp_avg"], old_avg)
    assert bool((optimizer.state[fc1.first]["exp_avg_sq"] >= 0).all())
    assert set(lowrank.statistics) == set(FACTORISED) and lowrank.statistics["net.fc1"].kind == "hidden"


def test_a_layer_the_forward_never_uses_keeps_the_weight_basis_and_the_rest_are_rebased(
    quiet_trainer_kwargs: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    class WithSpare(ImageClassifier):
        def __init__(self) -> None:
            super().__init__(image_size=8)
            self.spare = nn.Linear(64, 64)  # in the model, never called

    pl.seed_everything(0)
    model = WithSpare()
    lowrank = LowRankRefactoring(rank_ratio=0.25, start_step=4, end_step=8, update_every=2, calibration_steps=4)
    pl.Trainer(max_steps=9, callbacks=[lowrank], **quiet_trainer_kwargs).fit(model, datamodule=DigitsDataModule())
    assert "spare saw no training batch in the 4 steps before start_step=4" in caplog.text
    assert "rebased 4 layers" in caplog.text and lowrank.rebased
    assert model.spare.first.shape[0] == lowrank.target_ranks["spare"] == 16


def test_with_gradient_accumulation_the_rebase_and_each_update_happen_once_per_step(
    quiet_trainer_kwargs: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    """Two micro-batches per step: statistics from both, one rebase at step 6, the ranks on the optimizer-step grid."""
    end = Snapshot(12)
    lowrank = LowRankRefactoring(rank_ratio=0.25, start_step=6, end_step=12, update_every=3, calibration_steps=3)
    fit(quiet_trainer_kwargs, [lowrank, end], max_steps=13, accumulate_grad_batches=2)
    assert caplog.text.count("rebased 4 layers") == 1
    assert end.ranks == lowrank.target_ranks


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"calibration_steps": 8}, r"`calibration_steps`=8 needs `start_step` >= 8 .* got start_step=0"),
        ({"calibration_steps": -1}, r"`calibration_steps` must be an integer >= 0; got -1"),
        ({"calibration_steps": True}, r"`calibration_steps` must be an integer >= 0; got True"),
        ({"calibration_steps": 2.5, "start_step": 4}, r"`calibration_steps` must be an integer >= 0; got 2.5"),
    ],
)
def test_bad_calibration_arguments_are_refused_at_construction(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LowRankRefactoring(rank_ratio=0.5, end_step=10, **kwargs)
