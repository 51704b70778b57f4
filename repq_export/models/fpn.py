"""Feature pyramid network with the inference semantics of mmdet 2.11's ``FPN`` (Swin-Det configs)."""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from .layers import ConvModule


class FPN(nn.Module):
    """1x1 laterals, nearest top-down sums, 3x3 outputs; extra levels by max-pool (k 1, stride 2).

    Takes one map per ``in_channels`` entry (finest first) and returns ``num_outs`` maps of
    ``out_channels`` channels, e.g. P2..P6 for the four Swin stages and ``num_outs=5``.
    """

    def __init__(self, in_channels: Sequence[int], out_channels: int, num_outs: int = 5) -> None:
        super().__init__()
        if not in_channels or num_outs < len(in_channels):
            raise ValueError(
                f"FPN: num_outs {num_outs} must be >= the number of input levels {len(in_channels)} (>= 1)"
            )
        self.num_outs = num_outs
        self.lateral_convs = nn.ModuleList(ConvModule(c, out_channels, 1) for c in in_channels)
        self.fpn_convs = nn.ModuleList(
            ConvModule(out_channels, out_channels, 3, padding=1) for _ in in_channels
        )

    def forward(self, inputs: Sequence[Tensor]) -> tuple[Tensor, ...]:
        """inputs: NCHW maps, one per level, finest first -> ``num_outs`` NCHW maps."""
        if len(inputs) != len(self.lateral_convs):
            raise ValueError(f"FPN: expected {len(self.lateral_convs)} input maps, got {len(inputs)}")
        laterals = [conv(x) for conv, x in zip(self.lateral_convs, inputs)]
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + F.interpolate(
                laterals[i], size=laterals[i - 1].shape[2:], mode="nearest"
            )
        outs = [conv(x) for conv, x in zip(self.fpn_convs, laterals)]
        while len(outs) < self.num_outs:
            outs.append(F.max_pool2d(outs[-1], 1, stride=2))
        return tuple(outs)
