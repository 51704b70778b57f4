"""Quantized replacements of Conv2d, Linear and the attention MatMul, and model-wide switches.

Each layer keeps the float module's ``weight``/``bias`` Parameters under the same names (so
state-dict keys stay those of the checkpoint) and adds its quantizers as children:
``input_quantizer`` + ``weight_quantizer`` (conv/linear) or ``quantizer_a`` + ``quantizer_b``
(matmul). As in the reference, weights are fake-quantized on every forward.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch.nn.functional as F
from torch import Tensor, nn

from repq_export.quant.log_sqrt2 import LogSqrt2Quantizer
from repq_export.quant.uniform import UniformQuantizer

Quantizer = UniformQuantizer | LogSqrt2Quantizer


class QuantLinear(nn.Module):
    """``F.linear(input_quantizer(x), weight_quantizer(weight), bias)``."""

    def __init__(self, linear: nn.Linear, input_quantizer: UniformQuantizer, weight_quantizer: UniformQuantizer) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.input_quantizer = input_quantizer
        self.weight_quantizer = weight_quantizer

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(self.input_quantizer(x), self.weight_quantizer(self.weight), self.bias)


class QuantConv2d(nn.Module):
    """``F.conv2d(input_quantizer(x), weight_quantizer(weight), bias, ...)`` with the conv's geometry."""

    def __init__(self, conv: nn.Conv2d, input_quantizer: UniformQuantizer, weight_quantizer: UniformQuantizer) -> None:
        super().__init__()
        if conv.padding_mode != "zeros":
            raise ValueError(f"QuantConv2d: padding_mode {conv.padding_mode!r} is not supported")
        self.in_channels = conv.in_channels
        self.out_channels = conv.out_channels
        self.kernel_size = conv.kernel_size
        self.stride = conv.stride
        self.padding = conv.padding
        self.dilation = conv.dilation
        self.groups = conv.groups
        self.weight = conv.weight
        self.bias = conv.bias
        self.input_quantizer = input_quantizer
        self.weight_quantizer = weight_quantizer

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, groups={self.groups}, bias={self.bias is not None}"
        )

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight_quantizer(self.weight)
        return F.conv2d(self.input_quantizer(x), w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class QuantMatMul(nn.Module):
    """``quantizer_a(a) @ quantizer_b(b)``; for ``attn @ v`` quantizer_a is log-sqrt2."""

    def __init__(self, quantizer_a: Quantizer, quantizer_b: UniformQuantizer) -> None:
        super().__init__()
        self.quantizer_a = quantizer_a
        self.quantizer_b = quantizer_b

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        return self.quantizer_a(a) @ self.quantizer_b(b)


def named_quantizers(model: nn.Module) -> Iterator[tuple[str, Quantizer]]:
    """Every quantizer of ``model`` with its dotted name, in module order."""
    for name, module in model.named_modules():
        if isinstance(module, (UniformQuantizer, LogSqrt2Quantizer)):
            yield name, module


def set_quant_enabled(model: nn.Module, enabled: bool) -> None:
    """Switch every quantizer on (fake-quant) or off (the float path, identity quantizers)."""
    for _, q in named_quantizers(model):
        q.enabled = enabled


def set_calibrating(model: nn.Module, calibrating: bool) -> None:
    """In calibration mode an uninitialised quantizer initialises from its first non-empty input."""
    for _, q in named_quantizers(model):
        q.calibrating = calibrating


@contextmanager
def quant_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` in float inside the block, restoring each quantizer's switch afterwards."""
    saved = [(q, q.enabled) for _, q in named_quantizers(model)]
    set_quant_enabled(model, False)
    try:
        yield model
    finally:
        for q, enabled in saved:
            q.enabled = enabled


@contextmanager
def calibration_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Calibration mode inside the block."""
    set_calibrating(model, True)
    try:
        yield model
    finally:
        set_calibrating(model, False)
