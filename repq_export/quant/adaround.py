"""Learned weight rounding (AdaRound) within a layer's existing per-channel uniform weight quantizer.

Each weight ``w`` with step ``s`` and zero point ``zp`` is ``s * (clamp(floor(w / s) + h + zp, 0, 2^n - 1) - zp)``,
where ``h`` in [0, 1] is the rectified sigmoid of a learned variable ``V``: ``clamp(sigmoid(V) * (ZETA - GAMMA)
+ GAMMA, 0, 1)``. ``V`` starts where ``h`` equals the fractional part of ``w / s`` (the soft weight equals ``w``).
The regularizer ``sum(1 - |2h - 1|^beta)`` pushes every ``h`` to 0 or 1 as ``beta`` is annealed down; at the
end the rounding is made hard (``h = [V >= 0]``) and the layer's float weight is replaced by the dequantized
value, so that the quantizer, unchanged, rounds it back to exactly the learned codes.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from repq_export.quant.uniform import UniformQuantizer

ZETA, GAMMA = 1.1, -0.1


def _per_channel(t: Tensor, like: Tensor) -> Tensor:
    """(C,) per-output-channel ``t`` shaped to broadcast against the weight ``like``."""
    return t.reshape(-1, *([1] * (like.dim() - 1)))


class SoftRounding(nn.Module):
    """The rounding variables of one weight tensor, for the weight quantizer ``q`` (per-channel, axis 0)."""

    def __init__(self, weight: Tensor, q: UniformQuantizer) -> None:
        super().__init__()
        if q.channel_axis != 0:
            raise ValueError("SoftRounding: the weight quantizer must be per output channel")
        w = weight.detach().float()
        self.register_buffer("scale", _per_channel(q.scale, w).clone())
        self.register_buffer("zero_point", _per_channel(q.zero_point, w).clone())
        self.qmax = 2**q.bits - 1
        ratio = w / self.scale
        self.register_buffer("floor", torch.floor(ratio))
        rest = (ratio - self.floor).clamp(1e-4, 1 - 1e-4)
        self.alpha = nn.Parameter(-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1))

    def h(self) -> Tensor:
        """Soft rounding offset in [0, 1] for every weight."""
        return torch.clamp(torch.sigmoid(self.alpha) * (ZETA - GAMMA) + GAMMA, 0, 1)

    def _weight(self, offset: Tensor) -> Tensor:
        codes = torch.clamp(self.floor + offset + self.zero_point, 0, self.qmax)
        return (codes - self.zero_point) * self.scale

    def soft_weight(self) -> Tensor:
        """The differentiable fake-quant weight with the current soft rounding."""
        return self._weight(self.h())

    def hard_codes(self) -> Tensor:
        """Integer codes (float dtype) in [0, 2^n - 1] with the rounding made hard."""
        return torch.clamp(self.floor + (self.alpha.detach() >= 0).float() + self.zero_point, 0, self.qmax)

    def hard_weight(self) -> Tensor:
        """The dequantized weight of the hard codes: ``scale * (code - zp)``."""
        return (self.hard_codes() - self.zero_point) * self.scale

    def regularizer(self, beta: float) -> Tensor:
        """``sum(1 - |2h - 1|^beta)``: 0 only when every ``h`` is 0 or 1."""
        return (1 - (2 * self.h() - 1).abs().pow(beta)).sum()


@torch.no_grad()
def write_hard_weight(layer: nn.Module, rounding: SoftRounding) -> Tensor:
    """Replace ``layer.weight`` by the dequantized hard codes; check the quantizer rounds them back exactly."""
    codes = rounding.hard_codes()
    layer.weight.copy_(rounding.hard_weight().to(layer.weight.dtype))
    q = layer.weight_quantizer
    if not torch.equal(q.codes(layer.weight), codes):
        raise AssertionError("learned rounding: the written weight does not round back to the learned codes")
    return codes
