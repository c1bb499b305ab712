"""Several techniques on one model: one order of action whatever the order of `callbacks`, overlaps refused up front,
tied weights left alone, and transformers' Conv1D pruned along the right dimensions."""

from __future__ import annotations

import itertools
import logging
from typing import Any

import pytest
import torch
from torch import nn

from lightning_compress import GradualPruning, LowRankRefactoring, QuantizationAwareTraining
from lightning_compress._lightning import Callback, pl


class ConvNet(pl.LightningModule):
    """Convolutions for low-rank, Linears for pruning, QAT on all: every pair of techniques shares a layer."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.fc1 = nn.Linear(16 * 4 * 4, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        x = nn.functional.adaptive_avg_pool2d(x, 4).flatten(1)
        return self.fc2(torch.relu(self.fc1(x)))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        generator = torch.Generator().manual_seed(1)
        data = torch.utils.data.TensorDataset(
            torch.randn(40, 1, 8, 8, generator=generator), torch.randint(0, 10, (40,), generator=generator)
        )
        return torch.utils.data.DataLoader(data, batch_size=8)  # 5 batches: the checkpoint at step 5 ends an epoch


def three_techniques() -> list[Callback]:
    return [
        LowRankRefactoring(
            rank_ratio=0.5, start_step=2, end_step=8, update_every=2, include=[r"conv\d"], truncate_at_fit_end=False
        ),  # fmt: skip
        GradualPruning(0.5, start_step=2, end_step=8, update_every=2, include=[r"fc\d"]),
        QuantizationAwareTraining(activation_bits=8, start_step=4, convert_at_fit_end=False),  # factors too
    ]


def fit(callbacks: list[Callback], quiet: dict[str, Any], steps: int = 10) -> tuple[dict[str, torch.Tensor], list]:
    model = ConvNet()
    trainer = pl.Trainer(max_steps=steps, callbacks=callbacks, **quiet)
    trainer.fit(model)
    return model.state_dict(), trainer.callbacks


def test_all_six_orders_of_the_three_techniques_train_bitwise_the_same_model(
    quiet_trainer_kwargs: dict[str, Any],
) -> None:
    reference, _ = fit(three_techniques(), quiet_trainer_kwargs)
    assert any(key.endswith("first") for key in reference), "low-rank factorised nothing"
    assert any(key.endswith("fake_quant_enabled") for key in reference), "QAT swapped nothing"
    assert any(key.startswith("conv2.hidden_observer") for key in reference), "QAT left the factors alone"
    pruned = reference["fc1.weight"]
    assert 0.45 <= float((pruned == 0).float().mean()) <= 0.55
    for order in list(itertools.permutations(range(3)))[1:]:
        callbacks = three_techniques()
        state, _ = fit([callbacks[i] for i in order], quiet_trainer_kwargs)
        assert state.keys() == reference.keys(), order
        for key, value in reference.items():
            assert torch.equal(state[key], value), f"order {order}: {key} differs"


def test_low_rank_and_qat_on_the_same_layers_train_quantized_factors_that_convert_and_export_to_int8(
    tmp_path: Any, quiet_trainer_kwargs: dict[str, Any]
) -> None:
    from lightning_compress import convert_to_int8, load_compressed, save_compressed

    lowrank = LowRankRefactoring(rank_ratio=0.5, start_step=2, end_step=8, update_every=2, include=[r"conv\d"])
    qat = QuantizationAwareTraining(activation_bits=8, start_step=4, convert_at_fit_end=False)
    model = ConvNet()
    pl.Trainer(max_steps=10, callbacks=[qat, lowrank], **quiet_trainer_kwargs).fit(model)
    assert type(model.conv2).__name__ == "QATLowRankConv2d" and model.conv2.active_rank < 16
    assert lowrank.layers["conv2"] is model.conv2  # the low-rank callback acts on the wrapper QAT put in place
    model.eval()
    images = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(4))
    int8 = convert_to_int8(model)
    assert type(int8.conv2).__name__ == "Int8LowRankConv2d"
    with torch.no_grad():
        qat_out, int8_out = model(images), int8(images)
        assert float((int8_out - qat_out).abs().max() / qat_out.abs().max()) <= 1e-2
        path = tmp_path / "model.safetensors"
        save_compressed(model, path)
        assert torch.equal(load_compressed(path, model=ConvNet())(images), int8_out)  # into a fresh float ConvNet


def test_the_techniques_take_one_order_in_the_trainer_and_every_other_callback_keeps_its_place(
    quiet_trainer_kwargs: dict[str, Any],
) -> None:
    lowrank, pruning, qat = three_techniques()
    marker = Callback()
    _, callbacks = fit([qat, marker, pruning, lowrank], quiet_trainer_kwargs, steps=2)
    assert callbacks[:4] == [lowrank, marker, pruning, qat]


def test_a_resumed_composed_run_ends_bitwise_equal_to_one_never_stopped(
    tmp_path: Any, quiet_trainer_kwargs: dict[str, Any]
) -> None:
    from lightning_compress._lightning import submodule

    checkpoint_cls = submodule("callbacks").ModelCheckpoint
    uninterrupted, _ = fit(three_techniques(), quiet_trainer_kwargs)

    saver = checkpoint_cls(dirpath=tmp_path / "ckpt", every_n_train_steps=5, save_top_k=-1)
    first = pl.Trainer(max_steps=5, callbacks=[*three_techniques(), saver], **{**quiet_trainer_kwargs,
                       "enable_checkpointing": True})  # fmt: skip
    first.fit(ConvNet())
    (path,) = (tmp_path / "ckpt").glob("*.ckpt")
    model = ConvNet()
    resumed = pl.Trainer(max_steps=10, callbacks=list(reversed(three_techniques())), **quiet_trainer_kwargs)
    resumed.fit(model, ckpt_path=path)
    state = model.state_dict()
    for key, value in uninterrupted.items():
        assert torch.equal(state[key], value), f"{key} differs after resume"


@pytest.mark.parametrize(
    ("make", "why"),
    [
        (lambda: [GradualPruning(0.5, end_step=4), LowRankRefactoring(rank_ratio=0.5, end_step=4)],
         "a factorised layer has no dense weight left to mask"),
        (lambda: [GradualPruning(0.5, end_step=4), GradualPruning(0.3, end_step=4, include=["fc1"])],
         "two instances of one technique would act twice on the same weights"),
    ],
    ids=["pruning+lowrank", "pruning-twice"],
)  # fmt: skip
def test_two_techniques_on_one_layer_that_do_not_compose_are_refused_at_setup_the_same_way_in_either_order(
    make: Any, why: str, quiet_trainer_kwargs: dict[str, Any]
) -> None:
    messages = []
    for reverse in (False, True):
        callbacks = make()
        model = ConvNet()
        before = {name: type(m) for name, m in model.named_modules()}
        trainer = pl.Trainer(max_steps=2, callbacks=callbacks[::-1] if reverse else callbacks, **quiet_trainer_kwargs)
        with pytest.raises(ValueError, match="both target") as info:
            trainer.fit(model)
        messages.append(str(info.value))
        assert why in messages[-1]
        assert "HINT: give them disjoint layers" in messages[-1]
        assert {name: type(m) for name, m in model.named_modules()} == before, "a layer was swapped before refusing"
    assert messages[0] == messages[1]


def test_an_export_path_that_exists_is_refused_before_any_technique_changes_the_model(
    tmp_path: Any, quiet_trainer_kwargs: dict[str, Any]
) -> None:
    existing = tmp_path / "model.safetensors"
    existing.write_bytes(b"keep me")
    lowrank, pruning, _ = three_techniques()
    qat = QuantizationAwareTraining(include=[r"fc\d"], export_path=str(existing))
    model = ConvNet()
    trainer = pl.Trainer(max_steps=2, callbacks=[lowrank, pruning, qat], **quiet_trainer_kwargs)
    with pytest.raises(FileExistsError, match="already exists"):
        trainer.fit(model)
    assert isinstance(model.conv1, nn.Conv2d) and isinstance(model.fc1, nn.Linear)
    assert existing.read_bytes() == b"keep me"


class TiedHead(pl.LightningModule):
    """A language-model head that shares the token embedding's weight, as GPT-2's and T5's do."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(32, 16)
        self.body = nn.Linear(16, 16)
        self.head = nn.Linear(16, 32, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.body(self.embed(ids))))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        (ids,) = batch
        return nn.functional.cross_entropy(self(ids).flatten(0, 1), ids.flatten())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        ids = torch.randint(0, 32, (16, 6), generator=torch.Generator().manual_seed(2))
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids), batch_size=4)


@pytest.mark.parametrize(
    "make",
    [
        lambda: GradualPruning(0.5, end_step=2, update_every=1),
        lambda: QuantizationAwareTraining(),
        lambda: LowRankRefactoring(rank_ratio=0.25, end_step=2, update_every=1, min_saving=0.0),
    ],
    ids=["pruning", "qat", "lowrank"],
)
def test_a_tied_weight_is_left_out_with_one_log_line_and_stays_tied(
    make: Any, quiet_trainer_kwargs: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    model = TiedHead()
    params_before = sum(p.numel() for p in model.parameters())
    with caplog.at_level(logging.INFO):
        pl.Trainer(max_steps=3, callbacks=[make()], **quiet_trainer_kwargs).fit(model)
    lines = [r.getMessage() for r in caplog.records if "head (tied to embed)" in r.getMessage()]
    assert len(lines) == 1, lines
    assert type(model.head) is nn.Linear and model.head.weight is model.embed.weight
    assert sum(p.numel() for p in model.parameters()) <= params_before
    assert float((model.embed.weight == 0).float().mean()) < 0.1


def test_a_tied_weight_named_explicitly_is_refused_with_what_to_do() -> None:
    with pytest.raises(ValueError, match=r"`include` pattern 'head' names only layers whose weight is tied") as info:
        GradualPruning(0.5, end_step=2, include=["head"]).planned_targets(TiedHead())
    assert "head (tied to embed)" in str(info.value) and "tie_word_embeddings=False" in str(info.value)


def gpt2() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=16,
                                     bos_token_id=0, eos_token_id=0)  # fmt: skip
    return transformers.GPT2LMHeadModel(config)


class GPT2Module(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = gpt2()

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        (ids,) = batch
        return self.model(input_ids=ids, labels=ids).loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        ids = torch.randint(0, 64, (8, 16), generator=torch.Generator().manual_seed(3))
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids), batch_size=4)


def conv1d_weights(module: nn.Module) -> dict[str, torch.Tensor]:
    from transformers.pytorch_utils import Conv1D

    return {name: m.weight.detach() for name, m in module.named_modules() if isinstance(m, Conv1D)}


def test_gpt2s_conv1d_layers_are_pruned_2_of_4_along_their_input_dimension(
    quiet_trainer_kwargs: dict[str, Any],
) -> None:
    module = GPT2Module()
    pl.Trainer(max_steps=2, callbacks=[GradualPruning(pattern="2:4", end_step=1, update_every=1)],
               **quiet_trainer_kwargs).fit(module)  # fmt: skip
    weights = conv1d_weights(module)
    assert len(weights) == 4
    for name, weight in weights.items():  # (in, out): groups of 4 consecutive inputs for each output column
        groups = (weight != 0).t().reshape(weight.shape[1], -1, 4).sum(dim=-1)
        assert int(groups.max()) <= 2 and float((weight == 0).float().mean()) == pytest.approx(0.5), name


def test_gpt2s_conv1d_layers_lose_whole_output_columns_and_their_bias_under_channel_pruning(
    quiet_trainer_kwargs: dict[str, Any],
) -> None:
    module = GPT2Module()
    pruning = GradualPruning(0.25, pattern="channel", end_step=1, update_every=1)
    pl.Trainer(max_steps=2, callbacks=[pruning], **quiet_trainer_kwargs).fit(module)
    layer = module.model.transformer.h[0].mlp.c_fc
    dead = (layer.weight == 0).all(dim=0)  # output columns
    assert int(dead.sum()) == round(0.25 * layer.weight.shape[1])
    assert torch.all(layer.bias[dead] == 0)
    assert not torch.any((layer.weight == 0).all(dim=1)), "input rows must not be what is pruned"


class WithBilinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.mix = nn.Bilinear(8, 8, 4)


@pytest.mark.parametrize(
    "technique",
    [
        lambda include: GradualPruning(0.5, end_step=2, include=include),
        lambda include: QuantizationAwareTraining(include=include),
        lambda include: LowRankRefactoring(rank_ratio=0.5, end_step=2, include=include),
    ],
    ids=["pruning", "qat", "lowrank"],
)
def test_a_layer_type_no_technique_supports_is_named_in_the_error_with_what_to_do(technique: Any) -> None:
    with pytest.raises(ValueError) as info:
        technique(["mix"]).planned_targets(WithBilinear())
    assert "it names mix, of type Bilinear, which this technique does not support" in str(info.value)
    assert "HINT: drop the pattern" in str(info.value)
    with pytest.raises(ValueError) as info:
        technique(None).planned_targets(nn.Sequential(nn.Bilinear(8, 8, 4)))
    assert "torch.nn.modules.linear.Bilinear, which this technique does not support" in str(info.value)


def test_qat_and_low_rank_take_gpt2s_conv1d_layers_and_leave_its_tied_head() -> None:
    module = GPT2Module()
    expected = [f"model.transformer.h.0.{layer}" for layer in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    assert QuantizationAwareTraining().planned_targets(module) == expected
    assert LowRankRefactoring(rank_ratio=0.5, end_step=2).planned_targets(module) == expected


def test_the_composed_reference_cnn_on_fashion_mnist_exports_to_at_most_a_fifteenth_of_its_dense_checkpoint(
    tmp_path: Any, quiet_trainer_kwargs: dict[str, Any]
) -> None:
    """Low-rank on conv2, pruning to 95 % and int8 on the rest: the file and its reload, against `torch.save`."""
    from lightning_compress import convert_to_int8, load_compressed, save_compressed
    from lightning_compress.data import FashionMNISTDataModule
    from lightning_compress.models import ImageClassifier

    torch.manual_seed(0)
    model, data = ImageClassifier(), FashionMNISTDataModule(batch_size=64, limit_train=640, val_size=1000)
    dense = tmp_path / "dense.pt"
    torch.save(model.state_dict(), dense)
    callbacks = [
        QuantizationAwareTraining(activation_bits=8, start_step=4, exclude=[r"net\.conv2"], convert_at_fit_end=False),
        GradualPruning(0.95, start_step=2, end_step=8, update_every=2, exclude=[r"net\.conv2"]),
        LowRankRefactoring(rank_ratio=0.125, start_step=2, end_step=8, update_every=2, include=[r"net\.conv2"]),
    ]
    pl.Trainer(max_steps=10, callbacks=callbacks, **quiet_trainer_kwargs).fit(model, datamodule=data)
    model.eval()
    path = tmp_path / "composed.safetensors"
    written = save_compressed(model, path)
    assert written == path.stat().st_size and written <= dense.stat().st_size / 15, (written, dense.stat().st_size)
    images = next(iter(data.val_dataloader()))[0][:32]
    with torch.no_grad():  # the file holds the int8 form of the QAT layers
        assert torch.equal(load_compressed(path)(images), convert_to_int8(model)(images))
