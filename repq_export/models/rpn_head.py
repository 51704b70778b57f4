"""RPN head and its proposal generation, as mmdet 2.11's ``RPNHead`` at test time.

Per level: top ``nms_pre`` sigmoid scores; all levels: decode (stds from ``target_stds``),
clip to the image, NMS per level (batched by level id), keep the best ``max_proposals``.
No minimum box size filtering (min_bbox_size 0 in the reference configs).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from repq_export.errors import UserError
from repq_export.models.anchors import AnchorGenerator
from repq_export.models.bbox_head import batched_nms
from repq_export.models.box_coder import DeltaXYWHBoxCoder
from repq_export.reference_settings import RPN_MAX_PER_IMG, RPN_NMS_IOU, RPN_NMS_PRE


def topk_count(n_items: Tensor, k: int) -> Tensor | int:
    """``min(k, len)`` for a 1-D tensor; stays a graph value while tracing so it is dynamic in ONNX."""
    if torch.jit.is_tracing():
        return torch.clamp(torch._shape_as_tensor(n_items)[0], max=k)
    return min(k, n_items.shape[0])


class RPNHead(nn.Module):
    """``forward(feats, img_hw) -> (proposals (n, 4), scores (n,))``, n <= ``max_proposals``.

    Children ``rpn_conv`` (3x3 + ReLU), ``rpn_cls`` (A sigmoid logits), ``rpn_reg`` (4A deltas).
    """

    def __init__(
        self,
        in_channels: int = 256,
        feat_channels: int = 256,
        anchor_generator: AnchorGenerator | None = None,
        target_stds: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
        nms_pre: int = RPN_NMS_PRE,
        nms_iou: float = RPN_NMS_IOU,
        max_proposals: int = RPN_MAX_PER_IMG,
    ) -> None:
        super().__init__()
        if nms_pre < 1 or max_proposals < 1:
            raise UserError(
                f"rpn_head: nms_pre and max_proposals must be >= 1, got {nms_pre}, {max_proposals}"
            )
        self.anchor_generator = anchor_generator if anchor_generator is not None else AnchorGenerator()
        num_anchors = self.anchor_generator.num_base_anchors
        self.rpn_conv = nn.Conv2d(in_channels, feat_channels, 3, padding=1)
        self.rpn_cls = nn.Conv2d(feat_channels, num_anchors, 1)
        self.rpn_reg = nn.Conv2d(feat_channels, num_anchors * 4, 1)
        self.bbox_coder = DeltaXYWHBoxCoder(stds=target_stds)
        self.nms_pre = int(nms_pre)
        self.nms_iou = float(nms_iou)
        self.max_proposals = int(max_proposals)

    def forward_single(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Raw (1, A, H, W) logits and (1, 4A, H, W) deltas of one level."""
        x = F.relu(self.rpn_conv(x))
        return self.rpn_cls(x), self.rpn_reg(x)

    def forward(self, feats: Sequence[Tensor], img_hw: Tensor) -> tuple[Tensor, Tensor]:
        if len(feats) != self.anchor_generator.num_levels:
            raise UserError(
                f"rpn_head: {len(feats)} feature maps for {self.anchor_generator.num_levels} anchor levels"
            )
        outs = [self.forward_single(x) for x in feats]
        return self.proposals([o[0] for o in outs], [o[1] for o in outs], img_hw)

    def proposals(
        self, cls_maps: Sequence[Tensor], reg_maps: Sequence[Tensor], img_hw: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Proposals (n, 4) and their scores (n,) from the raw per-level outputs (batch 1)."""
        scores_all, deltas_all, anchors_all, levels_all = [], [], [], []
        for level, (cls_map, reg_map) in enumerate(zip(cls_maps, reg_maps)):
            scores = cls_map[0].permute(1, 2, 0).reshape(-1).sigmoid()
            deltas = reg_map[0].permute(1, 2, 0).reshape(-1, 4)
            anchors = self.anchor_generator.single_level(level, cls_map.shape[2], cls_map.shape[3])
            scores, top = scores.topk(topk_count(scores, self.nms_pre))
            scores_all.append(scores)
            deltas_all.append(deltas[top])
            anchors_all.append(anchors[top])
            levels_all.append(torch.full_like(top, level))
        scores = torch.cat(scores_all)
        boxes = self.bbox_coder.decode(torch.cat(anchors_all), torch.cat(deltas_all), img_hw)
        keep = batched_nms(boxes, scores, torch.cat(levels_all), self.nms_iou)[: self.max_proposals]
        return boxes[keep], scores[keep]
