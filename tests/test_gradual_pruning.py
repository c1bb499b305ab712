"""GradualPruning in real single-process fits on digits: the schedule is followed at every optimizer step, masked
weights are exactly zero after every step, patterns hold, runs resume bitwise, and bad input fails before a step."""

from __future__ import annotations

import copy
import csv
import itertools
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_compress import GradualPruning, RecipeError, load_recipe, schedules
from lightning_compress._lightning import Callback, LightningModule, pl
from lightning_compress.data import DigitsDataModule
from lightning_compress.models import ImageClassifier

LAYERS = ("net.conv1", "net.conv2", "net.fc1", "net.fc2")  # every weighted layer of the reference CNN
STEPS_PER_EPOCH = 19  # 1,168 training digits in batches of 64


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """These models are tiny: one intra-op thread is as fast, and immune to OpenMP spin-waits on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def build(data_cls: type[DigitsDataModule] = DigitsDataModule) -> tuple[ImageClassifier, DigitsDataModule]:
    pl.seed_everything(0, verbose=False)
    return ImageClassifier(image_size=8), data_cls(batch_size=64)


def make_trainer(quiet: dict[str, Any], callbacks: list[Callback], max_steps: int, **overrides: Any) -> pl.Trainer:
    kwargs = {**quiet, "max_steps": max_steps, "limit_val_batches": 0, "callbacks": callbacks, **overrides}
    return pl.Trainer(**kwargs)


def fit(
    quiet: dict[str, Any], callbacks: list[Callback], max_steps: int, **overrides: Any
) -> tuple[pl.Trainer, ImageClassifier]:
    model, data = build()
    trainer = make_trainer(quiet, callbacks, max_steps, **overrides)
    trainer.fit(model, data)
    return trainer, model


def zero_fraction(tensors: list[torch.Tensor]) -> float:
    return sum(int((t == 0).sum()) for t in tensors) / sum(t.numel() for t in tensors)


def assert_n_m(weight: torch.Tensor, n: int, m: int) -> None:
    """EXHAUSTIVE: every group of m consecutive weights along the input dimension has at most n non-zeros."""
    out_features, in_features = weight.shape[:2]
    for row in range(out_features):
        for position in itertools.product(*(range(k) for k in weight.shape[2:])):
            for start in range(0, in_features, m):
                group = weight[(row, slice(start, start + m), *position)]
                assert int((group != 0).sum()) <= n, (row, position, start, group)


class Watch(Callback):
    """Placed AFTER GradualPruning: after every optimizer step it sees the weights the next forward will use."""

    def __init__(self, pruning: GradualPruning, layers: tuple[str, ...] = LAYERS) -> None:
        self.pruning, self.layers = pruning, layers
        self.sparsity: dict[int, float] = {}  # measured zeros among the targeted weights, by optimizer step
        self.layer_sparsity: dict[int, dict[str, float]] = {}
        self.revived: list[tuple[int, str, int]] = []  # (step, parameter, masked entries that are not 0.0)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: LightningModule, *args: Any) -> None:
        step = trainer.global_step
        for name, mask in self.pruning.masks.items():
            value = pl_module.get_parameter(name).detach()
            bad = int((value[~mask.to(value.device)] != 0).sum())
            if bad:
                self.revived.append((step, name, bad))
        weights = {layer: pl_module.get_parameter(f"{layer}.weight").detach() for layer in self.layers}
        self.sparsity[step] = zero_fraction(list(weights.values()))
        self.layer_sparsity[step] = {layer: zero_fraction([w]) for layer, w in weights.items()}


# ------------------------------------------------------------------------------------------------ the schedule


def test_digits_has_19_training_steps_per_epoch() -> None:
    data = DigitsDataModule(batch_size=64)
    data.setup("fit")
    assert len(data.train_dataloader()) == STEPS_PER_EPOCH


@pytest.mark.parametrize(
    ("schedule", "scope"),
    [("cubic", "global"), ("linear", "global"), ("exponential", "global"), ("constant", "global"), ("cubic", "layer")],
)
def test_sparsity_follows_the_schedule_at_every_optimizer_step(
    schedule: str, scope: str, quiet_trainer_kwargs: dict[str, Any]
) -> None:
    target, start, end, every, last = 0.9, 3, 23, 5, 28
    pruning = GradualPruning(target, start_step=start, end_step=end, update_every=every, schedule=schedule, scope=scope)
    watch = Watch(pruning)
    fit(quiet_trainer_kwargs, [pruning, watch], max_steps=last)

    assert sorted(watch.sparsity) == list(range(1, last + 1))
    assert watch.revived == []  # every masked weight is exactly 0.0 after every optimizer step
    for step, measured in watch.sparsity.items():
        expected = schedules.value_at(
            step, schedule=schedule, target=target, start_step=start, end_step=end, update_every=every
        )
        assert measured == pytest.approx(expected, abs=0.01), f"step {step}"
    assert watch.sparsity[last] == pytest.approx(target, abs=0.005)
    assert pruning.sparsity() == pytest.approx(target, abs=0.005)
    if scope == "layer":
        for layer, measured in watch.layer_sparsity[last].items():
            assert measured == pytest.approx(target, abs=0.005), layer
        assert pruning.layer_sparsity() == pytest.approx(dict.fromkeys(LAYERS, target), abs=0.005)
    else:  # one ranking across layers: the big layers carry more of the zeros than the tiny first conv
        assert watch.layer_sparsity[last]["net.fc1"] > watch.layer_sparsity[last]["net.conv1"]


def test_masks_are_recomputed_only_on_the_update_grid(quiet_trainer_kwargs: dict[str, Any]) -> None:
    class Changes(Callback):
        def __init__(self, pruning: GradualPruning) -> None:
            self.pruning, self.previous, self.changed_at = pruning, None, []

        def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
            masks = {n: m.clone() for n, m in self.pruning.masks.items()}
            if self.previous is not None and (
                masks.keys() != self.previous.keys() or any(not torch.equal(masks[n], self.previous[n]) for n in masks)
            ):
                self.changed_at.append(trainer.global_step)
            self.previous = masks

    pruning = GradualPruning(0.8, start_step=3, end_step=23, update_every=4, schedule="linear")
    changes = Changes(pruning)
    fit(quiet_trainer_kwargs, [pruning, changes], max_steps=30)
    assert changes.changed_at == [3, 7, 11, 15, 19, 23]  # masks appear at step 3 (0 %: all kept), then shrink


def test_gradient_accumulation_counts_optimizer_steps(quiet_trainer_kwargs: dict[str, Any]) -> None:
    pruning = GradualPruning(0.7, start_step=0, end_step=10, update_every=2, schedule="linear")
    watch = Watch(pruning)
    fit(quiet_trainer_kwargs, [pruning, watch], max_steps=12, accumulate_grad_batches=2)
    assert watch.revived == []
    for step, measured in watch.sparsity.items():
        expected = schedules.value_at(step, schedule="linear", target=0.7, start_step=0, end_step=10, update_every=2)
        assert measured == pytest.approx(expected, abs=0.01), f"step {step}"
    assert watch.sparsity[12] == pytest.approx(0.7, abs=0.005)


# ------------------------------------------------------------------------------------------------ patterns


def test_n_m_needs_every_input_dimension_divisible_by_m(quiet_trainer_kwargs: dict[str, Any]) -> None:
    model, data = build()
    trainer = make_trainer(quiet_trainer_kwargs, [GradualPruning(pattern="2:4", end_step=20)], max_steps=30)
    with pytest.raises(
        ValueError,
        match=r"`pattern`='2:4' needs .* multiple of M=4, but net\.conv1 \(Conv2d\) has 1\."
        r" HINT: add 'net\.conv1' to `exclude`",
    ):
        trainer.fit(model, data)
    assert trainer.global_step == 0


def test_n_m_2_4_holds_exhaustively_after_a_fit(quiet_trainer_kwargs: dict[str, Any]) -> None:
    pruning = GradualPruning(pattern="2:4", start_step=0, end_step=20, update_every=5, exclude=["net.conv1"])
    layers = ("net.conv2", "net.fc1", "net.fc2")
    watch = Watch(pruning, layers)
    _, model = fit(quiet_trainer_kwargs, [pruning, watch], max_steps=25)
    assert watch.revived == []
    assert pruning.target_sparsity == 0.5
    assert watch.sparsity[10] == pytest.approx(
        schedules.value_at(10, schedule="cubic", target=0.5, start_step=0, end_step=20, update_every=5), abs=0.01
    )
    for layer in layers:
        weight = model.get_parameter(f"{layer}.weight").detach()
        assert_n_m(weight, 2, 4)
        assert zero_fraction([weight]) == pytest.approx(0.5, abs=0.001)
    assert zero_fraction([model.net.conv1.weight]) == 0.0  # excluded: dense


def test_channel_pattern_zeroes_whole_rows_and_their_biases(quiet_trainer_kwargs: dict[str, Any]) -> None:
    pruning = GradualPruning(0.5, end_step=20, update_every=5, pattern="channel", scope="layer", exclude=["net.fc2"])
    watch = Watch(pruning, ("net.conv1", "net.conv2", "net.fc1"))
    _, model = fit(quiet_trainer_kwargs, [pruning, watch], max_steps=25)
    assert watch.revived == []  # biases of pruned channels included: they are in `masks` too
    assert "net.fc1.bias" in pruning.masks
    for layer in ("net.conv1", "net.conv2", "net.fc1"):
        module = model.get_submodule(layer)
        rows = module.weight.detach().flatten(1)
        dead = (rows == 0).all(dim=1)
        assert int(dead.sum()) == rows.shape[0] // 2, layer
        assert (rows[~dead] != 0).any(dim=1).all()
        assert (module.bias.detach()[dead] == 0).all(), f"{layer}: a pruned channel kept its bias"
        assert (module.bias.detach()[~dead] != 0).all()
    assert zero_fraction([model.net.fc2.weight]) == 0.0


# ------------------------------------------------------------------------------------------------ resume


def _uninterrupted_and_resumed(
    tmp_path: Path, quiet: dict[str, Any], data_cls: type[DigitsDataModule], arguments: dict[str, Any], max_steps: int
) -> tuple[tuple[ImageClassifier, GradualPruning], tuple[ImageClassifier, GradualPruning]]:
    def pruning() -> GradualPruning:
        return GradualPruning(0.9, **arguments)

    model_a, data_a = build(data_cls)
    pruning_a = pruning()
    every_19 = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=STEPS_PER_EPOCH, save_top_k=-1)
    make_trainer(quiet, [pruning_a, every_19], max_steps, enable_checkpointing=True).fit(model_a, data_a)
    checkpoint = tmp_path / "ckpt" / "epoch=0-step=19.ckpt"  # the last batch of epoch 0: resumes exactly
    assert checkpoint.is_file(), sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    saved = torch.load(checkpoint, weights_only=False)["callbacks"][pruning_a.state_key]
    assert saved["last_step"] == 19 and saved["masks"]

    model_b, data_b = build(data_cls)
    pruning_b = pruning()
    trainer_b = make_trainer(quiet, [pruning_b], max_steps)
    trainer_b.fit(model_b, data_b, ckpt_path=checkpoint)
    assert trainer_b.global_step == max_steps
    return (model_a, pruning_a), (model_b, pruning_b)


def _assert_same_run(a: tuple[ImageClassifier, GradualPruning], b: tuple[ImageClassifier, GradualPruning]) -> None:
    (model_a, pruning_a), (model_b, pruning_b) = a, b
    state_a, state_b = model_a.state_dict(), model_b.state_dict()
    assert state_a.keys() == state_b.keys()
    different = [name for name in state_a if not torch.equal(state_a[name], state_b[name])]
    assert different == [], f"not bitwise equal after resume: {different}"
    assert pruning_a.masks.keys() == pruning_b.masks.keys()
    assert all(
        torch.equal(pruning_a.masks[n], pruning_b.masks[n].to(pruning_a.masks[n].device)) for n in pruning_a.masks
    )
    assert pruning_a.state_dict()["mask_sparsity"] == pruning_b.state_dict()["mask_sparsity"] == 0.9


@pytest.mark.parametrize(
    "arguments",
    [
        pytest.param({"start_step": 0, "end_step": 50, "update_every": 5}, id="on-grid"),
        # Step 19 lies between the grid steps 16 and 21: the masks of steps 20 and 21, and the weights to rewind to
        # at step 50, can only come from the checkpoint.
        pytest.param({"start_step": 1, "end_step": 50, "update_every": 5, "rewind_step": 10}, id="mid-interval-rewind"),
    ],
)
def test_resume_from_the_last_batch_of_an_epoch_is_bitwise_exact(
    arguments: dict[str, Any], tmp_path: Path, quiet_trainer_kwargs: dict[str, Any]
) -> None:
    """The callback's own state (masks, schedule position, rewind values) resumes exactly."""
    _assert_same_run(*_uninterrupted_and_resumed(tmp_path, quiet_trainer_kwargs, DigitsDataModule, arguments, 60))


def test_resume_with_the_bundled_digits_loader_is_bitwise_exact(
    tmp_path: Path, quiet_trainer_kwargs: dict[str, Any]
) -> None:
    arguments = {"start_step": 0, "end_step": 24, "update_every": 5}
    _assert_same_run(*_uninterrupted_and_resumed(tmp_path, quiet_trainer_kwargs, DigitsDataModule, arguments, 25))


# ------------------------------------------------------------------------------------------------ rewind


@pytest.mark.parametrize("rewind_step", [0, 5])
def test_rewind_resets_survivors_to_their_values_at_rewind_step(
    rewind_step: int, quiet_trainer_kwargs: dict[str, Any]
) -> None:
    end = 20

    class Snapshots(Callback):
        def __init__(self) -> None:
            self.at: dict[int, dict[str, torch.Tensor]] = {}

        def _take(self, step: int, pl_module: LightningModule) -> None:
            self.at[step] = {f"{m}.weight": pl_module.get_parameter(f"{m}.weight").detach().clone() for m in LAYERS}

        def on_train_start(self, trainer: pl.Trainer, pl_module: LightningModule) -> None:
            self._take(0, pl_module)

        def on_train_batch_end(self, trainer: pl.Trainer, pl_module: LightningModule, *args: Any) -> None:
            if trainer.global_step in (rewind_step, end - 1, end):
                self._take(trainer.global_step, pl_module)
                if trainer.global_step == end:
                    self.final_masks = {n: m.clone() for n, m in pruning.masks.items()}

    pruning = GradualPruning(0.8, start_step=0, end_step=end, update_every=5, rewind_step=rewind_step)
    snapshots = Snapshots()
    fit(quiet_trainer_kwargs, [pruning, snapshots], max_steps=end + 3)

    for name, mask in snapshots.final_masks.items():
        rewound = snapshots.at[end][name]
        assert torch.equal(rewound, snapshots.at[rewind_step][name] * mask), name
        assert (rewound[~mask] == 0).all()
        trained = snapshots.at[end - 1][name]
        assert not torch.equal(rewound[mask], trained[mask]), f"{name} was not rewound"
    assert pruning.rewind_values == {}  # used once, then dropped


# ------------------------------------------------------------------------------------------------ logging


def test_sparsity_is_logged_to_the_trainers_loggers(tmp_path: Path, quiet_trainer_kwargs: dict[str, Any]) -> None:
    pruning = GradualPruning(0.9, start_step=0, end_step=20, update_every=5)
    logger = CSVLogger(tmp_path, name="csv", version=0)
    fit(quiet_trainer_kwargs, [pruning], max_steps=25, logger=logger, log_every_n_steps=1)
    with open(Path(logger.log_dir) / "metrics.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    assert {"compress/sparsity", *(f"compress/sparsity/{layer}" for layer in LAYERS)} <= set(rows[0])
    overall = [float(r["compress/sparsity"]) for r in rows if r["compress/sparsity"]]
    assert len(overall) == 25
    assert overall == sorted(overall) and overall[0] < overall[-1]
    assert overall[-1] == pytest.approx(0.9, abs=0.005)
    fc1 = [float(r["compress/sparsity/net.fc1"]) for r in rows if r["compress/sparsity/net.fc1"]]
    assert len(fc1) >= 4 and fc1 == sorted(fc1) and fc1[-1] > 0.8


# ------------------------------------------------------------------------------------------------ the result


def test_after_fit_the_model_is_a_plain_module_with_zeros_in_place(quiet_trainer_kwargs: dict[str, Any]) -> None:
    pruning = GradualPruning(0.75, start_step=0, end_step=10, update_every=5)
    _, model = fit(quiet_trainer_kwargs, [pruning], max_steps=12)
    fresh = ImageClassifier(image_size=8)
    assert model.state_dict().keys() == fresh.state_dict().keys()  # no weight_orig / weight_mask
    assert not any("weight_orig" in name or "mask" in name for name, _ in model.named_parameters())
    assert not any("mask" in name for name, _ in model.named_buffers())
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks, type(module).__name__
        assert type(module) is type(fresh.get_submodule(_name_of(model, module)))
    assert not any(param._backward_hooks for param in model.parameters())  # the gradient masks went at fit end
    clone = copy.deepcopy(model)
    assert zero_fraction([clone.get_parameter(f"{layer}.weight") for layer in LAYERS]) == pytest.approx(0.75, abs=0.005)
    for name, mask in pruning.masks.items():
        assert (model.get_parameter(name)[~mask] == 0).all()
        assert torch.equal(clone.get_parameter(name), model.get_parameter(name))


class GradientsBeforeTheStep(Callback):
    """In ``on_before_optimizer_step``: each targeted weight's gradient, and the gradient of the same batch's loss
    through an unhooked copy of the network (``copy.deepcopy`` leaves tensor hooks behind)."""

    def __init__(self) -> None:
        self.batch: Any = None
        self.seen: dict[int, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: LightningModule, batch: Any, *args: Any) -> None:
        self.batch = batch

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        clone = copy.deepcopy(pl_module.net)
        x, y = self.batch
        names = [f"{layer}.weight" for layer in LAYERS]
        params = [clone.get_parameter(name.removeprefix("net.")) for name in names]
        dense = torch.autograd.grad(F.cross_entropy(clone(x), y), params)
        self.seen[trainer.global_step] = {
            name: (pl_module.get_parameter(name).grad.clone(), g) for name, g in zip(names, dense, strict=True)
        }


def test_pruned_weights_get_no_gradient_so_clipping_and_optimizers_see_the_live_ones(
    quiet_trainer_kwargs: dict[str, Any],
) -> None:
    pruning = GradualPruning(0.9, schedule="constant", start_step=3, end_step=4, update_every=1)
    watch = GradientsBeforeTheStep()
    fit(quiet_trainer_kwargs, [pruning, watch], max_steps=6)
    for step in (0, 1, 2):  # no masks yet: the gradient is backward's own
        for name, (grad, dense) in watch.seen[step].items():
            torch.testing.assert_close(grad, dense, rtol=1e-5, atol=1e-7, msg=f"step {step} {name}")
    for step in (3, 4, 5):
        for name, (grad, dense) in watch.seen[step].items():
            mask = pruning.masks[name]
            assert (grad[~mask] == 0).all(), f"step {step}: {name} has a gradient on pruned weights"
            assert dense[~mask].abs().sum() > 0  # the model does have one there: the hook removed it
            torch.testing.assert_close(grad[mask], dense[mask], rtol=1e-5, atol=1e-7, msg=f"step {step} {name}")


def _name_of(root: nn.Module, module: nn.Module) -> str:
    return next(name for name, m in root.named_modules() if m is module)


def test_two_instances_coexist_with_their_own_state(tmp_path: Path, quiet_trainer_kwargs: dict[str, Any]) -> None:
    fc = GradualPruning(0.9, end_step=10, update_every=5, include=[r"net\.fc\d"])
    conv = GradualPruning(0.5, end_step=10, update_every=5, include=[r"net\.conv\d"], scope="layer")
    assert fc.state_key != conv.state_key
    trainer, model = fit(quiet_trainer_kwargs, [fc, conv], max_steps=12)
    assert set(fc.masks) == {"net.fc1.weight", "net.fc2.weight"}
    assert set(conv.masks) == {"net.conv1.weight", "net.conv2.weight"}
    assert zero_fraction([model.net.fc1.weight, model.net.fc2.weight]) == pytest.approx(0.9, abs=0.005)
    assert zero_fraction([model.net.conv2.weight]) == pytest.approx(0.5, abs=0.005)

    path = tmp_path / "both.ckpt"
    trainer.save_checkpoint(path)
    states = torch.load(path, weights_only=False)["callbacks"]
    assert set(states[fc.state_key]["masks"]) == set(fc.masks)
    assert set(states[conv.state_key]["masks"]) == set(conv.masks)

    # Restored into new instances built in the other order, each gets its own masks back.
    fc_again = GradualPruning(0.9, end_step=10, update_every=5, include=[r"net\.fc\d"])
    conv_again = GradualPruning(0.5, end_step=10, update_every=5, include=[r"net\.conv\d"], scope="layer")
    model_b, data_b = build()
    make_trainer(quiet_trainer_kwargs, [conv_again, fc_again], 14).fit(model_b, data_b, ckpt_path=path)
    for old, new in ((fc, fc_again), (conv, conv_again)):
        assert new.masks.keys() == old.masks.keys()
        assert all(torch.equal(new.masks[n].cpu(), old.masks[n].cpu()) for n in old.masks)


# ------------------------------------------------------------------------------------------------ transformers


class TinyBertClassifier(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        from transformers import BertConfig, BertModel

        config = BertConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=100
        )
        self.bert = BertModel(config)
        self.head = nn.Linear(32, 2)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        tokens, labels = batch
        pooled = self.bert(input_ids=tokens).last_hidden_state.mean(dim=1)
        return F.cross_entropy(self.head(pooled), labels)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def test_a_hugging_face_bert_encoder_is_pruned_and_nothing_else(quiet_trainer_kwargs: dict[str, Any]) -> None:
    pytest.importorskip("transformers")
    pl.seed_everything(0, verbose=False)
    model = TinyBertClassifier()
    tokens = torch.randint(0, 100, (64, 12))
    loader = DataLoader(TensorDataset(tokens, torch.randint(0, 2, (64,))), batch_size=8)
    encoder_linears = {
        name for name, m in model.named_modules() if isinstance(m, nn.Linear) and name.startswith("bert.encoder.layer.")
    }
    assert len(encoder_linears) == 2 * 6  # q, k, v, attention output, intermediate, output per layer
    others = {
        name: p.detach().clone()
        for name, p in model.named_parameters()
        if not any(name == f"{layer}.weight" for layer in encoder_linears)
    }

    # Names are matched whole: the encoder sits under `bert.` in this LightningModule.
    with pytest.raises(
        ValueError, match=r"`include` pattern 'encoder\\\\\.layer.*' matches no .*bert\.encoder\.layer\.0"
    ):
        pl.Trainer(
            **quiet_trainer_kwargs,
            max_steps=1,
            callbacks=[GradualPruning(0.8, end_step=10, include=[r"encoder\.layer\.\d+\..*"])],
        ).fit(model, loader)

    pruning = GradualPruning(0.8, start_step=0, end_step=10, update_every=2, include=[r"bert\.encoder\.layer\.\d+\..*"])
    pl.Trainer(**quiet_trainer_kwargs, max_steps=12, callbacks=[pruning]).fit(model, loader)

    assert set(pruning.layer_sparsity()) == encoder_linears
    weights = [model.get_parameter(f"{layer}.weight") for layer in encoder_linears]
    assert zero_fraction(weights) == pytest.approx(0.8, abs=0.005)
    assert pruning.sparsity() == pytest.approx(0.8, abs=0.005)
    assert all(0 < zero_fraction([w]) < 1 for w in weights)
    for name, before in others.items():  # embeddings, LayerNorms, biases, pooler and head: no zeros were added
        after = model.get_parameter(name).detach()
        assert int((after == 0).sum()) <= int((before == 0).sum()), name


# ------------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"target_sparsity": -0.1}, r"`target_sparsity` must be a number in \[0, 1\) .*; got -0\.1\. HINT"),
        ({"target_sparsity": 1.0}, r"`target_sparsity` must be a number in \[0, 1\) .*; got 1\.0\."),
        ({"target_sparsity": 1.5}, r"`target_sparsity` must be a number in \[0, 1\) .*; got 1\.5\."),
        ({"target_sparsity": None}, r"`target_sparsity` is required for `pattern`='unstructured'"),
        ({"target_sparsity": "high"}, r"`target_sparsity` must be a number in \[0, 1\) .*; got 'high'"),
        (
            {"end_step": 10, "start_step": 10},
            r"`end_step` must be greater than `start_step`: got end_step=10, start_step=10",
        ),
        (
            {"end_step": 5, "start_step": 10},
            r"`end_step` must be greater than `start_step`: got end_step=5, start_step=10",
        ),
        ({"end_step": None}, r"`end_step` must be an integer step after `start_step`=0; got None"),
        ({"start_step": -1}, r"`start_step` must be an integer >= 0; got -1"),
        ({"update_every": 0}, r"`update_every` must be an integer >= 1; got 0"),
        ({"update_every": -1}, r"`update_every` must be an integer >= 1; got -1"),
        ({"update_every": 2.5}, r"`update_every` must be an integer >= 1; got 2\.5"),
        ({"pattern": "random"}, r"`pattern` must be 'unstructured', 'channel' or 'N:M' such as '2:4'; got 'random'"),
        ({"schedule": "quadratic"}, r"`schedule` must be one of cubic, linear, exponential, constant; got 'quadratic'"),
        (
            {"pattern": "4:4", "target_sparsity": None},
            r"`pattern` '4:4' keeps N=4 of every M=4 weights: N must satisfy",
        ),
        ({"pattern": "2:4", "target_sparsity": 0.3}, r"`target_sparsity`=0\.3 contradicts `pattern`='2:4'.* 0\.5"),
        (
            {"pattern": "channel", "scope": "global"},
            r"`pattern`='channel' with `scope`='global' is not supported.*HINT: use scope='layer'",
        ),
        ({"scope": "local"}, r"`scope` must be one of global, layer; got 'local'"),
        ({"rewind_step": 20}, r"`rewind_step` must be an integer in \[0, end_step=20\) or None; got 20"),
        ({"rewind_step": 25}, r"`rewind_step` must be an integer in \[0, end_step=20\) or None; got 25"),
        ({"rewind_step": -1}, r"`rewind_step` must be an integer in \[0, end_step=20\) or None; got -1"),
        ({"include": "net.fc1"}, r'`include` must be a list of regular expressions.*HINT: write include=\["net.fc1"\]'),
        ({"exclude": ["net.fc(1"]}, r"`exclude` holds an invalid regular expression 'net\.fc\(1'"),
    ],
)
def test_bad_arguments_raise_at_construction(kwargs: dict[str, Any], match: str) -> None:
    arguments = {"target_sparsity": 0.5, "end_step": 20, **kwargs}
    with pytest.raises(ValueError, match=match):
        GradualPruning(**arguments)


def test_n_m_may_state_its_implied_sparsity() -> None:
    assert GradualPruning(0.5, end_step=10, pattern="2:4").target_sparsity == 0.5
    assert GradualPruning(end_step=10, pattern="1:4").target_sparsity == 0.75


def test_an_include_that_matches_no_module_raises_at_fit_start_before_any_step(
    quiet_trainer_kwargs: dict[str, Any],
) -> None:
    model, data = build()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = make_trainer(quiet_trainer_kwargs, [GradualPruning(0.5, end_step=10, include=["net.fc9"])], max_steps=5)
    with pytest.raises(
        ValueError,
        match=r"`include` pattern 'net\.fc9' matches no .* Candidates: net\.conv1, net\.conv2,"
        r" net\.fc1, net\.fc2",
    ):
        trainer.fit(model, data)
    assert trainer.global_step == 0
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())


# ------------------------------------------------------------------------------------------------ recipes


def test_a_recipe_builds_gradual_pruning_by_full_path_and_short_name(tmp_path: Path) -> None:
    recipe = tmp_path / "prune.yaml"
    recipe.write_text(
        textwrap.dedent(r"""
        trainer:
          max_steps: 100
          callbacks:
            - class_path: lightning_compress.GradualPruning
              init_args:
                target_sparsity: 0.9
                end_step: 50
                schedule: exponential
                exclude: ["net\\.fc2"]
            - class_path: GradualPruning
              init_args: {pattern: "2:4", start_step: 10, end_step: 40, include: ["net\\.fc1"]}
    """)
    )
    first, second = load_recipe(recipe)
    assert isinstance(first, GradualPruning) and isinstance(second, GradualPruning)
    assert (first.target_sparsity, first.end_step, first.schedule, first.exclude) == (
        0.9,
        50,
        "exponential",
        [r"net\.fc2"],
    )
    assert (str(second.pattern), second.target_sparsity, second.start_step, second.include) == (
        "2:4",
        0.5,
        10,
        [r"net\.fc1"],
    )
    assert first.state_key != second.state_key


@pytest.mark.parametrize(
    ("line", "match"),
    [
        (
            'target_sparsity: "high"',
            r"line 5, `trainer\.callbacks\[0\]\.init_args\.target_sparsity`: GradualPruning "
            r"argument `target_sparsity` expects float \| null, got 'high' \(str\)",
        ),
        (
            "target_sparsity: 1.5",
            r"GradualPruning\(\.\.\.\) raised ValueError: `target_sparsity` must be a number in \[0, 1\)",
        ),
        (
            "schedule: quadratic",
            r"`schedule` expects 'cubic' \| 'linear' \| 'exponential' \| 'constant', got 'quadratic'",
        ),
        ("update_every: five", r"`update_every` expects int, got 'five'"),
    ],
)
def test_a_recipe_with_wrong_values_is_rejected(tmp_path: Path, line: str, match: str) -> None:
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(
        "trainer:\n  callbacks:\n    - class_path: GradualPruning\n      init_args:\n"
        f"        {line}\n        end_step: 50\n"
        + ("" if line.startswith("target_sparsity") else "        target_sparsity: 0.5\n")
    )
    with pytest.raises(RecipeError, match=match):
        load_recipe(recipe)


def test_channel_pruning_defaults_to_layer_scope_and_unstructured_to_global() -> None:
    assert GradualPruning(0.5, end_step=10, pattern="channel").scope == "layer"
    assert GradualPruning(0.5, end_step=10).scope == "global"
    assert GradualPruning(end_step=10, pattern="2:4").scope == "global"
