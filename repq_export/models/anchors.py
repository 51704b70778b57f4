"""Anchor generation for the RPN, with the conventions of mmdet 2.11's ``AnchorGenerator``.

Base anchors are centred on (0, 0) of their grid cell (center offset 0, no rounding); the
grid anchor at feature cell (y, x) is ``base + (x * stride, y * stride)``, ordered
(y, x, anchor) so that it matches the RPN outputs permuted to (H, W, A).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from repq_export.errors import UserError


def base_anchors(base_size: float, scales: Sequence[float], ratios: Sequence[float]) -> Tensor:
    """Anchors (A, 4) x1y1x2y2 of one level around (0, 0), ratio-major then scale (A = R * S).

    Computed in float32 in the same operation order as mmdet so the values are bit-identical.
    """
    scales_t = torch.tensor(list(scales), dtype=torch.float32)
    ratios_t = torch.tensor(list(ratios), dtype=torch.float32)
    h_ratios = torch.sqrt(ratios_t)
    w_ratios = 1 / h_ratios
    ws = (base_size * w_ratios[:, None] * scales_t[None, :]).reshape(-1)
    hs = (base_size * h_ratios[:, None] * scales_t[None, :]).reshape(-1)
    return torch.stack([-0.5 * ws, -0.5 * hs, 0.5 * ws, 0.5 * hs], dim=-1)


class AnchorGenerator(nn.Module):
    """Per-level anchor grids; holds only non-persistent buffers (no state-dict keys)."""

    def __init__(
        self,
        strides: Sequence[int] = (4, 8, 16, 32, 64),
        ratios: Sequence[float] = (0.5, 1.0, 2.0),
        scales: Sequence[float] = (8,),
        base_sizes: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        if base_sizes is None:
            base_sizes = strides
        if len(base_sizes) != len(strides):
            raise UserError(
                f"anchor_generator: {len(base_sizes)} base sizes for {len(strides)} strides"
            )
        if not strides or not ratios or not scales:
            raise UserError("anchor_generator: strides, ratios and scales must not be empty")
        self.strides = [int(s) for s in strides]
        self.ratios = [float(r) for r in ratios]
        self.scales = [float(s) for s in scales]
        base = torch.stack([base_anchors(b, self.scales, self.ratios) for b in base_sizes])
        self.register_buffer("base", base, persistent=False)

    @property
    def num_levels(self) -> int:
        return len(self.strides)

    @property
    def num_base_anchors(self) -> int:
        """Anchors per feature cell (the same on every level)."""
        return self.base.shape[1]

    def single_level(self, level: int, feat_h: int, feat_w: int) -> Tensor:
        """All anchors (feat_h * feat_w * A, 4) of one level, in (y, x, anchor) order.

        ``feat_h``/``feat_w`` may be traced sizes: the grid stays dynamic in an ONNX export.
        """
        stride = self.strides[level]
        device = self.base.device
        shift_x = torch.arange(feat_w, device=device, dtype=torch.float32) * stride
        shift_y = torch.arange(feat_h, device=device, dtype=torch.float32) * stride
        yy, xx = torch.meshgrid(shift_y, shift_x, indexing="ij")
        xx = xx.reshape(-1)
        yy = yy.reshape(-1)
        shifts = torch.stack([xx, yy, xx, yy], dim=-1)
        return (self.base[level][None, :, :] + shifts[:, None, :]).reshape(-1, 4)

    def grid_anchors(self, featmap_sizes: Sequence[tuple[int, int]]) -> list[Tensor]:
        """Anchors of every level for the given (h, w) feature-map sizes."""
        if len(featmap_sizes) != self.num_levels:
            raise UserError(
                f"anchor_generator: {len(featmap_sizes)} feature maps for {self.num_levels} levels"
            )
        return [self.single_level(i, h, w) for i, (h, w) in enumerate(featmap_sizes)]
