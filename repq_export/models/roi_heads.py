"""Test-time RoI heads of mmdet 2.11: ``StandardRoIHead`` (Mask R-CNN) and ``CascadeRoIHead``.

Both map (FPN features, proposals, img_hw) to the network outputs of the contract:
boxes (N, 4) clipped to img_hw, scores (N,), 0-based labels (N,) int64, masks (N, 28, 28)
sigmoid probabilities of the predicted class, N <= max_per_img.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn

from repq_export.boundary import NetTensors
from repq_export.errors import UserError
from repq_export.models.bbox_head import ConvFCBBoxHead, multiclass_nms
from repq_export.models.box_coder import DeltaXYWHBoxCoder
from repq_export.models.mask_head import FCNMaskHead
from repq_export.models.roi_extractor import MultiLevelRoIAlign
from repq_export.reference_settings import (BOX_STDS, CASCADE_STDS, RCNN_MAX_PER_IMG, RCNN_NMS_IOU,
                                            RCNN_SCORE_THR)


@dataclass
class RoITestSettings:
    """RoI feature sizes, FPN level mapping and the R-CNN test_cfg (mmdet 2.11 names)."""

    featmap_strides: Sequence[int] = (4, 8, 16, 32)
    bbox_roi_size: int = 7
    mask_roi_size: int = 14
    finest_scale: float = 56.0
    score_thr: float = RCNN_SCORE_THR
    nms_iou: float = RCNN_NMS_IOU
    max_per_img: int = RCNN_MAX_PER_IMG


def select_class_deltas(deltas: Tensor, labels: Tensor) -> Tensor:
    """The (n, 4) deltas of each RoI's label from class-specific (n, 4C) deltas."""
    idx = (labels * 4)[:, None] + torch.arange(4, device=labels.device)
    return torch.gather(deltas, 1, idx)


class _RoIHeadBase(nn.Module):
    """Shared test settings and the two RoI feature extractors (which hold no parameters)."""

    def __init__(self, settings: RoITestSettings) -> None:
        super().__init__()
        s = settings
        self.bbox_roi_extractor = MultiLevelRoIAlign(s.bbox_roi_size, s.featmap_strides, 0, s.finest_scale)
        self.mask_roi_extractor = MultiLevelRoIAlign(s.mask_roi_size, s.featmap_strides, 0, s.finest_scale)
        self.score_thr = float(s.score_thr)
        self.nms_iou = float(s.nms_iou)
        self.max_per_img = int(s.max_per_img)

    def _detect(
        self,
        cls_logits: Tensor,
        deltas: Tensor,
        rois: Tensor,
        coder: DeltaXYWHBoxCoder,
        img_hw: Tensor,
        class_agnostic: bool,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Softmax, decode + clip, class-wise NMS (mmdet ``BBoxHead.get_bboxes``)."""
        scores = torch.softmax(cls_logits, dim=-1)
        boxes = coder.decode(rois, deltas, img_hw)
        return multiclass_nms(
            boxes, scores, self.score_thr, self.nms_iou, self.max_per_img, class_agnostic
        )


class StandardRoIHead(_RoIHeadBase):
    """Mask R-CNN RoI head: one box head, one FCN mask head.

    ``forward(feats (>= 4 FPN levels), proposals (n, 4), img_hw (2,)) -> (boxes, scores, labels, masks)``.
    """

    def __init__(
        self,
        bbox_head: ConvFCBBoxHead,
        mask_head: FCNMaskHead,
        target_stds: Sequence[float] = BOX_STDS,
        settings: RoITestSettings | None = None,
    ) -> None:
        super().__init__(settings or RoITestSettings())
        self.bbox_head = bbox_head
        self.mask_head = mask_head
        self.bbox_coder = DeltaXYWHBoxCoder(stds=target_stds)

    def forward(self, feats: Sequence[Tensor], proposals: Tensor, img_hw: Tensor) -> NetTensors:
        cls_logits, deltas = self.bbox_head(self.bbox_roi_extractor(feats, proposals))
        # mmdet 2.11 zeroes the outputs of RoIs whose y2 is 0 (its batch-padding marker).
        padded = (proposals[:, 3] == 0)[:, None]
        cls_logits = torch.where(padded, torch.zeros_like(cls_logits), cls_logits)
        deltas = torch.where(padded, torch.zeros_like(deltas), deltas)
        boxes, scores, labels = self._detect(
            cls_logits, deltas, proposals, self.bbox_coder, img_hw, self.bbox_head.reg_class_agnostic
        )
        logits = self.mask_head(self.mask_roi_extractor(feats, boxes))
        return boxes, scores, labels, self.mask_head.class_probs(logits, labels)


class CascadeRoIHead(_RoIHeadBase):
    """Cascade (Mask) R-CNN RoI head with ``len(bbox_heads)`` stages.

    Between stages the RoIs are regressed with each stage's argmax foreground class; final
    scores are the softmax of the stage-averaged logits, final boxes come from the last stage,
    masks are the mean of all mask heads' sigmoid maps on the final boxes.
    """

    def __init__(
        self,
        bbox_heads: Sequence[ConvFCBBoxHead],
        mask_heads: Sequence[FCNMaskHead],
        stage_stds: Sequence[Sequence[float]] = CASCADE_STDS,
        settings: RoITestSettings | None = None,
    ) -> None:
        super().__init__(settings or RoITestSettings())
        if not bbox_heads or len(stage_stds) != len(bbox_heads) or len(mask_heads) != len(bbox_heads):
            raise UserError(
                f"roi_head: cascade needs as many bbox heads ({len(bbox_heads)}), mask heads "
                f"({len(mask_heads)}) and stage stds ({len(stage_stds)}), at least one"
            )
        self.bbox_head = nn.ModuleList(bbox_heads)
        self.mask_head = nn.ModuleList(mask_heads)
        self.bbox_coders = [DeltaXYWHBoxCoder(stds=s) for s in stage_stds]

    @property
    def num_stages(self) -> int:
        return len(self.bbox_head)

    def forward(self, feats: Sequence[Tensor], proposals: Tensor, img_hw: Tensor) -> NetTensors:
        rois = proposals
        stage_logits = []
        for i, head in enumerate(self.bbox_head):
            cls_logits, deltas = head(self.bbox_roi_extractor(feats, rois))
            stage_logits.append(cls_logits)
            if i < self.num_stages - 1:
                rois = self.refine(i, rois, cls_logits, deltas, img_hw)
        mean_logits = sum(stage_logits) / float(self.num_stages)
        last = self.bbox_head[-1]
        boxes, scores, labels = self._detect(
            mean_logits, deltas, rois, self.bbox_coders[-1], img_hw, last.reg_class_agnostic
        )
        mask_feats = self.mask_roi_extractor(feats, boxes)
        probs = [head.class_probs(head(mask_feats), labels) for head in self.mask_head]
        return boxes, scores, labels, sum(probs) / float(len(probs))

    def refine(self, stage: int, rois: Tensor, cls_logits: Tensor, deltas: Tensor, img_hw: Tensor) -> Tensor:
        """RoIs of the next stage: decode each RoI with its argmax foreground class (``regress_by_class``)."""
        if not self.bbox_head[stage].reg_class_agnostic:
            labels = cls_logits[:, :-1].argmax(dim=1)
            deltas = select_class_deltas(deltas, labels)
        return self.bbox_coders[stage].decode(rois, deltas, img_hw)
