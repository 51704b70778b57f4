"""A learned step for a per-tensor uniform activation quantizer, within its form (LSQ-style).

The quantizer keeps its integer zero point ``zp`` and its bits; only the step ``s`` is learned, as
``s = exp(t)`` (so that one learning rate fits steps of any size). The forward is the quantizer's own
fake quant, computed as ``round(clamp(x / s, -zp, 2^n - 1 - zp)) * s`` (the same values, since ``zp`` is an
integer) with a straight-through round: the gradient to ``s`` is LSQ's (``round(x/s) - x/s`` inside the
range, the bound ``-zp`` or ``2^n - 1 - zp`` outside, judged on the unrounded ``x/s``) and the gradient
to ``x`` passes inside the range only. At the end the learned step is written back into the
quantizer's ``scale`` buffer: the result is the same kind of quantizer with another step.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from repq_export.quant.uniform import MIN_SCALE, UniformQuantizer


def learnable(q: nn.Module) -> bool:
    """Whether ``q`` is a quantizer whose step can be learned here: uniform, per-tensor, calibrated, with an
    integer zero point (the reference mode's fractional ones stay as they are)."""
    return (isinstance(q, UniformQuantizer) and q.channel_axis is None and bool(q.initialized)
            and torch.equal(q.zero_point, torch.round(q.zero_point)))


class LearnedStep(nn.Module):
    """The learnable step of one per-tensor uniform quantizer ``q`` (its zero point and bits fixed)."""

    def __init__(self, q: UniformQuantizer) -> None:
        super().__init__()
        if not learnable(q):
            raise ValueError("LearnedStep: needs a calibrated per-tensor uniform quantizer with an integer zero point")
        self.register_buffer("zero_point", q.zero_point.detach().clone())
        self.register_buffer("start", q.scale.detach().clone())
        self.qmax = 2**q.bits - 1
        self.log_scale = nn.Parameter(torch.log(q.scale.detach().double()).float())

    def scale(self) -> Tensor:
        """The current step (differentiable), floored at the quantizer's MIN_SCALE."""
        return torch.clamp_min(torch.exp(self.log_scale), MIN_SCALE)

    def forward(self, x: Tensor) -> Tensor:
        s = self.scale()
        ratio = torch.clamp(x / s, -self.zero_point, self.qmax - self.zero_point)
        rounded = torch.round(ratio).detach() + (ratio - ratio.detach())  # straight-through, exact forward value
        return rounded * s

    @torch.no_grad()
    def write(self, q: UniformQuantizer) -> None:
        """Install the learned step in ``q`` (float32, the zero point unchanged)."""
        q.set_params(self.scale().detach().to(torch.float32), self.zero_point)
