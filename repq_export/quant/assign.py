"""Which module gets which quantizer: the reference's assignment over the whole detector.

- every ``nn.Conv2d`` / ``nn.Linear`` (ConvTranspose2d stays float): weight per-output-channel
  ``w_bits``;
- inputs of ``attn.qkv``, ``mlp.fc1`` and ``downsample.reduction`` (they follow a LayerNorm):
  per-channel (last dim) ``a_bits``, made per-tensor by reparameterization;
- input of ``backbone.patch_embed.proj``: 8-bit per-tensor;
- every other conv/linear input: per-tensor ``a_bits``;
- ``attn.matmul1``: both inputs per-tensor uniform ``a_bits``;
  ``attn.matmul2``: log-sqrt2 ``a_bits`` for the softmax output, per-tensor uniform for v.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from torch import nn

from repq_export.errors import UserError
from repq_export.models.layers import MatMul
from repq_export.quant.kinds import ACTIVATION, granularity_of, kind_of, role_of
from repq_export.quant.layers import QuantConv2d, QuantLinear, QuantMatMul, named_quantizers
from repq_export.quant.log_sqrt2 import LogSqrt2Quantizer
from repq_export.quant.uniform import UniformQuantizer

PER_CHANNEL_INPUT_SUFFIXES = (".attn.qkv", ".mlp.fc1", ".downsample.reduction")
PATCH_EMBED_CONV = "backbone.patch_embed.proj"
PATCH_EMBED_INPUT_BITS = 8


def check_bits(option: str, value: object) -> int:
    """``value`` as an int in 2..8, else a UserError naming ``option``."""
    if isinstance(value, bool) or not isinstance(value, int) or not 2 <= value <= 8:
        raise UserError(f"{option}: must be an integer in 2..8, got {value!r}")
    return value


def input_quantizer_for(name: str, a_bits: int) -> UniformQuantizer:
    """The input quantizer of the conv/linear called ``name`` (full dotted name in the detector)."""
    if name == PATCH_EMBED_CONV:
        return UniformQuantizer(PATCH_EMBED_INPUT_BITS)
    if name.endswith(PER_CHANNEL_INPUT_SUFFIXES):
        return UniformQuantizer(a_bits, channel_axis=-1)
    return UniformQuantizer(a_bits)


def quantize_modules(detector: nn.Module, w_bits: int, a_bits: int) -> None:
    """Replace, in place, every Conv2d / Linear / attention MatMul by its quantized version."""
    w_bits, a_bits = check_bits("w_bits", w_bits), check_bits("a_bits", a_bits)
    if any(True for _ in named_quantizers(detector)):
        raise ValueError("quantize_modules: the model is already quantized")
    modules = dict(detector.named_modules())
    for name, module in list(modules.items()):
        if isinstance(module, nn.Linear):
            new = QuantLinear(module, input_quantizer_for(name, a_bits), UniformQuantizer(w_bits, channel_axis=0))
        elif isinstance(module, nn.Conv2d):  # not ConvTranspose2d (not a subclass)
            new = QuantConv2d(module, input_quantizer_for(name, a_bits), UniformQuantizer(w_bits, channel_axis=0))
        elif isinstance(module, MatMul):
            a = LogSqrt2Quantizer(a_bits) if name.endswith("matmul2") else UniformQuantizer(a_bits)
            new = QuantMatMul(a, UniformQuantizer(a_bits))
        else:
            continue
        parent_name, _, child = name.rpartition(".")
        setattr(modules[parent_name], child, new)


@dataclass(frozen=True)
class QuantEntry:
    """One quantizer: dotted name, kind (quant/kinds.py), bits, granularity."""

    name: str
    kind: str
    bits: int
    granularity: str  # 'per_tensor', 'per_channel(axis=0)' (weights) or 'per_channel(axis=-1)'
    role: str = ACTIVATION


def quant_table(model: nn.Module) -> list[QuantEntry]:
    """The quantizers of ``model`` in module order."""
    return [QuantEntry(name, kind_of(q), q.bits, granularity_of(q), role_of(name, q))
            for name, q in named_quantizers(model)]


def quant_counts(table: list[QuantEntry]) -> dict[str, int]:
    """Number of quantizers by role, kind, bits and granularity, e.g. ``'weight uniform 4-bit per_channel(axis=0)'``."""
    counts = Counter(f"{e.role} {e.kind} {e.bits}-bit {e.granularity}" for e in table)
    return dict(sorted(counts.items()))
