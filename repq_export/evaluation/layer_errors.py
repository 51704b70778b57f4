"""How much each quantizer of a fake-quant model changes what passes through it, on real images.

The relative error ||q(x) - x|| / ||x|| of every quantizer (weights, activations, the attention
softmax) shows where precision is lost, and so which layers to keep at more bits when AP drops;
tier-1 code mismatches (parity) can be attached to the same rows.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..hooks import hooked
from ..quant.kinds import role_of
from ..quant.layers import named_quantizers
from ..quantizer_calls import scope_to_name
from .parity import CodeReport


@dataclass
class LayerError:
    """One quantizer's error over all its calls on the measured images."""

    name: str  # dotted module name of the quantizer
    role: str  # 'weight', 'activation' or 'softmax' (the log-sqrt2 attention probabilities)
    bits: int
    rel_error: float  # sqrt(sum ||q(x) - x||^2 / sum ||x||^2) over the calls
    calls: int
    code_mismatches: int | None = None  # tier 1 (not float ties), where the backend was probed


@torch.no_grad()
def measure_layer_errors(qmodel: nn.Module, images: Iterable[tuple[Tensor, Tensor]]) -> list[LayerError]:
    """Run `qmodel` on (img, img_hw) pairs and return each quantizer's relative error, in the order
    the quantizers are first called (forward order); quantizers never called are left out."""
    sums: dict[str, list[float]] = {}  # name -> [sum of squared error, sum of squared input, calls]
    quantizers = dict(named_quantizers(qmodel))

    def hook(name: str):
        def record(_module, inputs, output) -> None:
            x = inputs[0]
            if x.numel() == 0:
                return
            entry = sums.setdefault(name, [0.0, 0.0, 0])
            entry[0] += float((output.double() - x.double()).pow(2).sum())
            entry[1] += float(x.double().pow(2).sum())
            entry[2] += 1
        return record

    device = next(qmodel.parameters()).device
    with hooked((q, hook(name)) for name, q in quantizers.items()):
        for img, img_hw in images:
            qmodel(img.to(device), img_hw.to(device))
    return [LayerError(name, role_of(name, quantizers[name]), quantizers[name].bits,
                       (err / ref) ** 0.5 if ref > 0 else 0.0, int(calls))
            for name, (err, ref, calls) in sums.items()]


def attach_code_mismatches(errors: Sequence[LayerError], reports: Sequence[CodeReport]) -> None:
    """Set each row's tier-1 mismatch count (float ties excluded), summed over the quantizer's calls."""
    counts: dict[str, int] = {}
    for report in reports:
        name = scope_to_name(report.call)
        counts[name] = counts.get(name, 0) + report.mismatches - report.tie_mismatches
    for row in errors:
        if row.name in counts:
            row.code_mismatches = counts[row.name]
