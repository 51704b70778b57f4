"""R-CNN box heads (Shared2FC and 4conv1fc) and the class-wise NMS of mmdet 2.11.

In mmdet 2.x the background is the LAST of the ``num_classes + 1`` classification outputs.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.ops import nms

from repq_export.errors import UserError
from repq_export.models.layers import ConvModule


def batched_nms(boxes: Tensor, scores: Tensor, groups: Tensor, iou_threshold: float) -> Tensor:
    """Indices kept by NMS run independently per group, by decreasing score.

    Uses mmcv's offset trick (boxes shifted by ``group * (max_coordinate + 1)``) on every path,
    so eager and ONNX runs see the same float boxes. Safe for zero boxes.
    """
    flat = torch.cat([boxes.reshape(-1), boxes.new_zeros(1)])
    offsets = groups.to(boxes.dtype) * (flat.max() + 1)
    return nms(boxes + offsets[:, None], scores, iou_threshold)


def multiclass_nms(
    boxes: Tensor,
    scores: Tensor,
    score_thr: float,
    iou_threshold: float,
    max_num: int,
    class_agnostic: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """Class-wise NMS of R-CNN outputs, as mmdet's ``multiclass_nms``.

    ``boxes`` (n, 4 * C) class-specific, or (n, 4) shared when ``class_agnostic``;
    ``scores`` (n, C + 1) with the background last.
    Returns boxes (k, 4), scores (k,), 0-based labels (k,) by decreasing score, k <= max_num.
    """
    num_classes = scores.shape[1] - 1
    inds = torch.nonzero(scores[:, :num_classes].reshape(-1) > score_thr).squeeze(1)
    labels = inds % num_classes
    if class_agnostic:
        boxes = boxes[torch.div(inds, num_classes, rounding_mode="floor")]
    else:
        boxes = boxes.reshape(-1, 4)[inds]
    flat_scores = scores[:, :num_classes].reshape(-1)[inds]
    keep = batched_nms(boxes, flat_scores, labels, iou_threshold)[:max_num]
    return boxes[keep], flat_scores[keep], labels[keep]


class ConvFCBBoxHead(nn.Module):
    """Shared convs (3x3, conv[+BN]+ReLU) then shared fcs (+ReLU), then ``fc_cls``/``fc_reg``.

    ``forward(roi_feats (n, C, s, s)) -> (cls_logits (n, num_classes + 1), deltas (n, 4 * num_classes)
    or (n, 4) when ``reg_class_agnostic``)``.
    """

    def __init__(
        self,
        in_channels: int = 256,
        num_shared_convs: int = 0,
        num_shared_fcs: int = 2,
        conv_out_channels: int = 256,
        fc_out_channels: int = 1024,
        roi_feat_size: int = 7,
        num_classes: int = 80,
        reg_class_agnostic: bool = False,
        conv_norm: bool = False,
    ) -> None:
        super().__init__()
        if num_shared_fcs < 1:
            raise UserError(f"bbox_head: num_shared_fcs must be >= 1, got {num_shared_fcs}")
        self.num_classes = num_classes
        self.reg_class_agnostic = reg_class_agnostic
        self.shared_convs = nn.ModuleList(
            ConvModule(
                in_channels if i == 0 else conv_out_channels,
                conv_out_channels,
                3,
                padding=1,
                bias=not conv_norm,
                norm=conv_norm,
                act=True,
            )
            for i in range(num_shared_convs)
        )
        last = (conv_out_channels if num_shared_convs else in_channels) * roi_feat_size**2
        self.shared_fcs = nn.ModuleList(
            nn.Linear(last if i == 0 else fc_out_channels, fc_out_channels)
            for i in range(num_shared_fcs)
        )
        self.relu = nn.ReLU(inplace=True)
        self.fc_cls = nn.Linear(fc_out_channels, num_classes + 1)
        self.fc_reg = nn.Linear(fc_out_channels, 4 if reg_class_agnostic else 4 * num_classes)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        for conv in self.shared_convs:
            x = conv(x)
        x = x.flatten(1)
        for fc in self.shared_fcs:
            x = self.relu(fc(x))
        return self.fc_cls(x), self.fc_reg(x)


class Shared2FCBBoxHead(ConvFCBBoxHead):
    """The Mask R-CNN box head: two shared fcs, no convs."""

    def __init__(
        self,
        in_channels: int = 256,
        fc_out_channels: int = 1024,
        roi_feat_size: int = 7,
        num_classes: int = 80,
        reg_class_agnostic: bool = False,
    ) -> None:
        super().__init__(
            in_channels=in_channels,
            num_shared_convs=0,
            num_shared_fcs=2,
            fc_out_channels=fc_out_channels,
            roi_feat_size=roi_feat_size,
            num_classes=num_classes,
            reg_class_agnostic=reg_class_agnostic,
        )

