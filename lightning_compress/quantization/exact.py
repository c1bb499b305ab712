"""QAT layers in eval mode compute what their int8 form computes: integer sums, exactly.

Fake quantization in float sums the same products as the int8 kernels but rounds the sum; one activation that sits on
a .5 boundary then rounds the other way in the next layer, and the difference grows downstream (a MobileNetV2's logits
moved by 1 % from one flip among 25,600 activations). So for inference (eval, no autograd, quantized inputs, one scale
per output channel) the QAT layers compute through :func:`~lightning_compress.quantization.kernels.integer_exact`,
and the int8 model converted from them gives the same outputs. Training keeps the straight-through path.
"""

from __future__ import annotations

from typing import Any

import torch

from lightning_compress.quantization import kernels
from lightning_compress.quantization.fake_quant import quantize


class IntegerExactEval:
    """Mixed into the QAT layers (which supply the observers, specs, ``grouped``/``ungrouped`` and the flags)."""

    training: bool
    _fake_quant_on: bool
    activation_spec: Any
    group_size: int | None

    def _integer_exact(self) -> bool:
        """Eval-mode inference with quantized inputs: compute as the int8 kernels do (exact integer sums), so the int8
        model gives the same outputs. Float sums of the same products differ by rounding, and one activation on a .5
        boundary that rounds the other way downstream moved a MobileNetV2's logits by 1 %."""
        return (
            not self.training
            and not torch.is_grad_enabled()
            and self._fake_quant_on
            and self.activation_spec is not None
            and self.group_size is None
        )

    def _exact_output(self, x: torch.Tensor, compute: Any, channel_dim: int) -> torch.Tensor:
        """:meth:`forward` for :meth:`_integer_exact`: the integer codes of the input and weight through
        ``kernels.integer_exact``."""
        x_scale, x_zero_point = self.input_qparams()
        weight_scale, weight_zero_point = self.weight_qparams()
        x_codes = quantize(x, x_scale, x_zero_point, self.activation_spec)
        view = self.grouped(self.weight.detach())
        weight_codes = self.ungrouped(quantize(view, weight_scale, weight_zero_point, self.weight_spec))
        bias = None if self.bias is None else self.bias.detach()
        out = kernels.integer_exact(compute, x_codes, x_scale, x_zero_point, weight_codes, weight_scale.reshape(-1),
                                    bias, channel_dim)  # fmt: skip
        return out.to(x.dtype)
