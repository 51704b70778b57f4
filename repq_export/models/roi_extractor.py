"""Multi-level RoIAlign of mmdet 2.11's ``SingleRoIExtractor`` (no parameters).

Each box goes to FPN level ``floor(log2(sqrt(w * h) / finest_scale + 1e-6))`` clamped to the
available levels; RoIAlign is aligned (half-pixel) with adaptive sampling (sampling_ratio 0).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn
from torchvision.ops import roi_align

from repq_export.errors import UserError


def map_roi_levels(boxes: Tensor, num_levels: int, finest_scale: float = 56.0) -> Tensor:
    """Level index (n,) int64 of each x1y1x2y2 box (n, 4) by its scale sqrt(w * h). Width and height
    are floored at 0, so that a box inverted by float rounding (x2 a hair below x1) maps to level 0
    instead of NaN, which has no level."""
    scale = torch.sqrt((boxes[:, 2] - boxes[:, 0]).clamp(min=0) * (boxes[:, 3] - boxes[:, 1]).clamp(min=0))
    levels = torch.floor(torch.log2(scale / finest_scale + 1e-6))
    return levels.clamp(min=0, max=num_levels - 1).long()


class MultiLevelRoIAlign(nn.Module):
    """``forward(feats: list of (1, C, H_l, W_l), boxes (n, 4)) -> (n, C, out, out)``.

    Only the first ``len(featmap_strides)`` feature maps are used; each level's RoIAlign runs
    on its own boxes only (no wasted work on the other levels).
    """

    def __init__(
        self,
        output_size: int,
        featmap_strides: Sequence[int] = (4, 8, 16, 32),
        sampling_ratio: int = 0,
        finest_scale: float = 56.0,
    ) -> None:
        super().__init__()
        if not featmap_strides:
            raise UserError("roi_extractor: featmap_strides must not be empty")
        self.output_size = int(output_size)
        self.featmap_strides = [int(s) for s in featmap_strides]
        self.sampling_ratio = int(sampling_ratio)
        self.finest_scale = float(finest_scale)

    def forward(self, feats: Sequence[Tensor], boxes: Tensor) -> Tensor:
        num_levels = len(self.featmap_strides)
        if len(feats) < num_levels:
            raise UserError(f"roi_extractor: {len(feats)} feature maps for {num_levels} strides")
        rois = torch.cat([boxes.new_zeros(boxes.shape[0], 1), boxes], dim=1)
        levels = map_roi_levels(boxes, num_levels, self.finest_scale)
        size = self.output_size
        level_inds, level_feats = [], []
        for i, stride in enumerate(self.featmap_strides):
            inds = torch.nonzero(levels == i).squeeze(1)
            level_inds.append(inds)
            level_feats.append(
                roi_align(
                    feats[i],
                    rois[inds],
                    output_size=(size, size),
                    spatial_scale=1.0 / stride,
                    sampling_ratio=self.sampling_ratio,
                    aligned=True,
                )
            )
        # Outputs are grouped by level; put them back in box order with the inverse permutation
        # (a scatter of indices, which exports cleanly even when a level has no boxes).
        order = torch.cat(level_inds)
        inverse = torch.zeros_like(order).scatter(0, order, torch.arange(order.shape[0], device=order.device))
        return torch.cat(level_feats)[inverse]
