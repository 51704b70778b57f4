"""Put every quantized layer's bias on the int32 grid of (input scale x weight scale).

Integer kernels add the bias in the accumulator, as int32 in units of input_scale * weight_scale;
onnxruntime rewrites a float bias that way on its own (rounding it), which would make the
deployed graph differ from fake quant. Snapping the bias once, in the fake-quant model, makes
both compute the same thing (a departure from the reference, measured in docs/reference.md).
"""

from __future__ import annotations

import torch
from torch import nn

from repq_export.quant.layers import QuantConv2d, QuantLinear


def bias_grid(layer: QuantConv2d | QuantLinear) -> torch.Tensor | None:
    """Per-output-channel bias step input_scale * weight_scale, or None without a per-tensor input."""
    a, w = layer.input_quantizer, layer.weight_quantizer
    if a.per_channel or not w.per_channel:
        return None
    return a.scale * w.scale


@torch.no_grad()
def snap_biases(model: nn.Module) -> int:
    """Round each quantized conv/linear bias to its int32 grid in place; returns how many moved."""
    count = 0
    for module in model.modules():
        if isinstance(module, (QuantConv2d, QuantLinear)) and module.bias is not None:
            step = bias_grid(module)
            if step is None:
                continue
            module.bias.copy_(torch.round(module.bias / step) * step)
            count += 1
    return count
