"""Fold the BatchNorm that follows a quantized conv (the cascade heads' 4conv1fc) into that conv.

The integer weight codes stay the same: BN's per-channel factor f = gamma / sqrt(var + eps)
goes into the weight scale (|f|; a negative f flips the codes' sign and mirrors the zero
point) and the rest into the bias. The fake-quant model then computes what the deployed graph
computes (a conv with a bias, no BN), instead of the reference's float BN after the conv.
"""

from __future__ import annotations

import torch
from torch import nn

from repq_export.models.layers import ConvModule
from repq_export.quant.layers import QuantConv2d
from repq_export.quant.uniform import MIN_SCALE

FOLDED_FLOAT_WEIGHT = "folded_float_weight"  # buffer name: the conv's float weight times BN's factor


def foldable(module: nn.Module) -> bool:
    """A ConvModule whose conv is quantized and is followed by BatchNorm."""
    return isinstance(module, ConvModule) and isinstance(module.conv, QuantConv2d) and isinstance(
        module.bn, nn.BatchNorm2d)


@torch.no_grad()
def fold_into(conv: QuantConv2d, bn: nn.BatchNorm2d) -> None:
    """Make `conv` compute bn(conv(x)) with unchanged integer weight codes."""
    q = conv.weight_quantizer
    shape = (-1, 1, 1, 1)
    factor = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    sign = torch.where(factor < 0, -1.0, 1.0)
    signed_codes = (q.codes(conv.weight) - q.zero_point.reshape(shape)) * sign.reshape(shape)
    scale = torch.clamp_min(q.scale * factor.abs(), MIN_SCALE)
    zero_point = torch.where(factor < 0, (2**q.bits - 1) - q.zero_point, q.zero_point)
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    # the float weight of conv + BN, for GPTQ (quant/gptq.py), which rounds it on the folded grid; not saved
    conv.register_buffer(FOLDED_FLOAT_WEIGHT, (conv.weight * factor.reshape(shape)).detach().clone(), persistent=False)
    conv.weight.copy_(signed_codes * scale.reshape(shape))
    q.set_params(scale, zero_point)
    conv.bias = nn.Parameter((bias - bn.running_mean) * factor + bn.bias)
    if not torch.equal(q.codes(conv.weight) - zero_point.reshape(shape), signed_codes):
        raise AssertionError("BatchNorm folding changed integer weight codes")


def fold_batchnorms(detector: nn.Module) -> int:
    """Fold every BN after a quantized conv; returns how many were folded."""
    folded = 0
    for module in list(detector.modules()):
        if foldable(module):
            fold_into(module.conv, module.bn)
            module.bn = None
            folded += 1
    return folded


def prepare_folded_structure(detector: nn.Module) -> None:
    """The module structure of a folded model (BN removed, conv bias present), for loading a state."""
    for module in list(detector.modules()):
        if foldable(module):
            if module.conv.bias is None:
                module.conv.bias = nn.Parameter(torch.zeros(module.conv.out_channels))
            module.bn = None
