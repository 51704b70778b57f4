"""Delta (dx, dy, dw, dh) box coding of mmdet 2.11's ``DeltaXYWHBBoxCoder``.

Decoding clamps dw/dh to |log(wh_ratio_clip)| and clips the boxes to the image (0..w, 0..h),
in the same float32 operation order as mmdet.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from repq_export.errors import UserError


def clip_boxes(boxes: Tensor, img_hw: Tensor) -> Tensor:
    """Clip x1y1x2y2 boxes (..., 4k) to x in [0, w], y in [0, h]; ``img_hw`` is (h, w)."""
    hw = img_hw.to(device=boxes.device, dtype=boxes.dtype)
    max_xy = torch.stack([hw[1], hw[0]]).repeat(boxes.shape[-1] // 2)
    return torch.min(torch.clamp(boxes, min=0), max_xy)


class DeltaXYWHBoxCoder:
    """Encode boxes relative to reference boxes as normalized deltas, and decode them back."""

    def __init__(
        self,
        means: Sequence[float] = (0.0, 0.0, 0.0, 0.0),
        stds: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
        wh_ratio_clip: float = 16 / 1000,
    ) -> None:
        if len(means) != 4 or len(stds) != 4:
            raise UserError(f"bbox_coder: means/stds need 4 values, got {list(means)}, {list(stds)}")
        if not 0 < wh_ratio_clip < 1:
            raise UserError(f"bbox_coder: wh_ratio_clip must be in (0, 1), got {wh_ratio_clip}")
        self.means = tuple(float(m) for m in means)
        self.stds = tuple(float(s) for s in stds)
        self.max_ratio = abs(math.log(wh_ratio_clip))

    def encode(self, boxes: Tensor, targets: Tensor) -> Tensor:
        """Deltas (N, 4) that move ``boxes`` (N, 4) onto ``targets`` (N, 4)."""
        boxes = boxes.float()
        targets = targets.float()
        px = (boxes[..., 0] + boxes[..., 2]) * 0.5
        py = (boxes[..., 1] + boxes[..., 3]) * 0.5
        pw = boxes[..., 2] - boxes[..., 0]
        ph = boxes[..., 3] - boxes[..., 1]
        gx = (targets[..., 0] + targets[..., 2]) * 0.5
        gy = (targets[..., 1] + targets[..., 3]) * 0.5
        gw = targets[..., 2] - targets[..., 0]
        gh = targets[..., 3] - targets[..., 1]
        deltas = torch.stack(
            [(gx - px) / pw, (gy - py) / ph, torch.log(gw / pw), torch.log(gh / ph)], dim=-1
        )
        means = deltas.new_tensor(self.means)
        stds = deltas.new_tensor(self.stds)
        return (deltas - means) / stds

    def decode(self, boxes: Tensor, deltas: Tensor, img_hw: Tensor | None = None) -> Tensor:
        """Boxes (N, 4k) from reference ``boxes`` (N, 4) and ``deltas`` (N, 4k).

        With ``img_hw`` (h, w) the result is clipped to the image.
        """
        k = deltas.shape[-1] // 4
        d = deltas.reshape(deltas.shape[0], k, 4)
        d = d * d.new_tensor(self.stds) + d.new_tensor(self.means)
        dx, dy = d[..., 0], d[..., 1]
        dw = d[..., 2].clamp(min=-self.max_ratio, max=self.max_ratio)
        dh = d[..., 3].clamp(min=-self.max_ratio, max=self.max_ratio)
        px = ((boxes[:, 0] + boxes[:, 2]) * 0.5)[:, None]
        py = ((boxes[:, 1] + boxes[:, 3]) * 0.5)[:, None]
        pw = (boxes[:, 2] - boxes[:, 0])[:, None]
        ph = (boxes[:, 3] - boxes[:, 1])[:, None]
        gw = pw * dw.exp()
        gh = ph * dh.exp()
        gx = px + pw * dx
        gy = py + ph * dy
        out = torch.stack([gx - gw * 0.5, gy - gh * 0.5, gx + gw * 0.5, gy + gh * 0.5], dim=-1)
        out = out.reshape(deltas.shape[0], 4 * k)
        if img_hw is not None:
            out = clip_boxes(out, img_hw)
        return out
