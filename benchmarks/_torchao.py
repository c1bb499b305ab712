"""torchao, the reference the quantization benchmarks compare with (the ``bench`` extra; the library needs none of it).

- :func:`int8_inference`: ``Int8DynamicActivationInt8WeightConfig`` (int8 per-channel weights, dynamic per-token int8
  activations) on a copy's Linear layers, for int8_speed's inference timing;
- :func:`fake_quant_per_channel`: QAT prepare with ``IntxFakeQuantizeConfig`` int8 per-channel symmetric weights and
  per-token asymmetric activations, for int8_speed's training-step timing;
- :func:`qat_prepare` / :func:`qat_convert`: ``QATConfig(Int8DynamicActivationIntxWeightConfig(int8, PerAxis(0)))``,
  for qat_accuracy (prepared before fit, converted after; the same scheme as above).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

#: How qat_accuracy's results describe :func:`qat_prepare`.
QAT_SCHEDULE = {
    "torchao": "QATConfig(Int8DynamicActivationIntxWeightConfig(int8, PerAxis(0))), prepare at step 0",
    "weights": "int8 symmetric per channel",
    "activations": "int8 asymmetric per token, dynamic",
}


def int8_inference(model: nn.Module) -> nn.Module:
    """An int8 copy of ``model`` for inference, in eval mode."""
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    out = copy.deepcopy(model)
    quantize_(out, Int8DynamicActivationInt8WeightConfig())
    return out.eval()


def fake_quant_per_channel(model: nn.Module) -> nn.Module:
    """``model`` itself, its Linear layers swapped for FakeQuantizedLinear (w8 per channel, a8 per token)."""
    from torchao.quantization import quantize_
    from torchao.quantization.qat import IntxFakeQuantizeConfig, QATConfig

    config = QATConfig(
        activation_config=IntxFakeQuantizeConfig(torch.int8, "per_token", is_symmetric=False),
        weight_config=IntxFakeQuantizeConfig(torch.int8, "per_channel", is_symmetric=True),
        step="prepare",
    )
    quantize_(model, config)
    return model


def _base_config() -> Any:
    """The PTQ config whose QAT prepare gives int8 symmetric per-channel weights and int8 asymmetric per-token
    (dynamic) activations on every nn.Linear; its convert gives the matching int8 model."""
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig
    from torchao.quantization.granularity import PerAxis

    return Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int8, weight_granularity=PerAxis(0))


def qat_prepare(model: nn.Module) -> nn.Module:
    """``model`` itself, prepared for torchao's QAT (every nn.Linear a FakeQuantizedLinear)."""
    from torchao.quantization import quantize_
    from torchao.quantization.qat import QATConfig

    quantize_(model, QATConfig(_base_config(), step="prepare"))
    return model


def qat_convert(model: nn.Module) -> nn.Module:
    """``model`` itself, a :func:`qat_prepare` d model converted to torchao's int8 inference layers."""
    from torchao.quantization import quantize_
    from torchao.quantization.qat import QATConfig

    quantize_(model, QATConfig(_base_config(), step="convert"))
    return model
