"""The two-stage detector at the network boundary: backbone -> FPN -> RPN -> RoI head."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from repq_export.boundary import NetTensors
from repq_export.errors import UserError


class Detector(nn.Module):
    """Swin Mask R-CNN / Cascade Mask R-CNN with mmdet 2.11 test-time semantics (batch 1).

    ``forward(img (1, 3, Hp, Wp) normalized + padded, img_hw (2,) float (h, w) before padding)
    -> (boxes (N, 4) x1y1x2y2 resized-image pixels clipped to img_hw, scores (N,),
    labels (N,) int64 0-based, masks (N, MASK_SIZE, MASK_SIZE) sigmoid probabilities of the label)``.
    Child names equal the Swin-Det checkpoint's top-level keys.
    """

    def __init__(
        self, backbone: nn.Module, neck: nn.Module, rpn_head: nn.Module, roi_head: nn.Module
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.neck = neck
        self.rpn_head = rpn_head
        self.roi_head = roi_head

    def extract_feat(self, img: Tensor) -> tuple[Tensor, ...]:
        """FPN features (P2..P6 for the reference configs)."""
        return tuple(self.neck(self.backbone(img)))

    def forward(self, img: Tensor, img_hw: Tensor) -> NetTensors:
        if not torch.jit.is_tracing() and (img.dim() != 4 or img.shape[0] != 1):
            raise UserError(f"detector: input must be one image (1, 3, H, W), got {tuple(img.shape)}")
        feats = self.extract_feat(img)
        proposals, _ = self.rpn_head(feats, img_hw)
        return self.roi_head(feats, proposals, img_hw)
