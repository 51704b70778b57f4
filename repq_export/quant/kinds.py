"""The words every part of the project uses for quantizers: their kind, role and granularity.

One vocabulary, so that the quantizer table in ``repq.json``, the graph's quantizer-call table,
the parity reports and the pictures all say the same thing.
"""

from __future__ import annotations

from enum import StrEnum

from torch import nn


class QuantizerKind(StrEnum):
    """Which fake quantizer (and so which ONNX lowering) a quantizer is."""

    UNIFORM = "uniform"
    LOG_SQRT2 = "log_sqrt2"
    SHIFTED = "shifted"  # an 8-bit asymmetric input lowered as int8 codes shifted by 2^(n-1) (patch embed)


# the members under the short names the lowerings and reports use
UNIFORM, LOG_SQRT2, SHIFTED = QuantizerKind.UNIFORM, QuantizerKind.LOG_SQRT2, QuantizerKind.SHIFTED

# role: what it quantizes
WEIGHT = "weight"
ACTIVATION = "activation"
SOFTMAX = "softmax"  # the attention probabilities, log-sqrt2 quantized

# granularity
PER_TENSOR = "per_tensor"
PER_CHANNEL = "per_channel"


def kind_of(quantizer: nn.Module) -> QuantizerKind:
    """UNIFORM or LOG_SQRT2 (as fake quant defines it; SHIFTED is a lowering of a uniform one)."""
    from repq_export.quant.log_sqrt2 import LogSqrt2Quantizer

    return LOG_SQRT2 if isinstance(quantizer, LogSqrt2Quantizer) else UNIFORM


def role_of(name: str, quantizer: nn.Module) -> str:
    """WEIGHT, SOFTMAX or ACTIVATION, from the quantizer's module name and kind."""
    if name.endswith("weight_quantizer"):
        return WEIGHT
    return SOFTMAX if kind_of(quantizer) == LOG_SQRT2 else ACTIVATION


def granularity_of(quantizer: nn.Module) -> str:
    """PER_TENSOR, or PER_CHANNEL with its axis, e.g. ``per_channel(axis=0)``."""
    axis = getattr(quantizer, "channel_axis", None)
    return PER_TENSOR if axis is None else f"{PER_CHANNEL}(axis={axis})"
