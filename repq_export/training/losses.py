"""Loss functions of mmdet 2.11's two-stage detectors, as plain tensor math.

Every loss is a sum divided by an ``avg_factor`` the caller passes (mmdet normalises RPN and
R-CNN box and class losses by the number of *sampled* anchors / RoIs of the batch, positives and
negatives together), except the mask loss, which is a mean over the positive RoIs' pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import generalized_box_iou_loss

from repq_export.errors import UserError

BOX_LOSSES = ("L1Loss", "SmoothL1Loss", "GIoULoss")


@dataclass(frozen=True)
class BoxLossCfg:
    """A config's ``loss_bbox``: L1 / smooth L1 on deltas, or GIoU on decoded boxes."""

    type: str = "L1Loss"
    weight: float = 1.0
    beta: float = 1.0  # smooth L1 only

    def __post_init__(self) -> None:
        if self.type not in BOX_LOSSES:
            raise UserError(f"config: loss_bbox type '{self.type}' is not supported ({', '.join(BOX_LOSSES)})")

    @property
    def on_decoded_boxes(self) -> bool:
        """GIoU compares boxes, not deltas (mmdet ``reg_decoded_bbox=True``)."""
        return self.type == "GIoULoss"


def objectness_loss(logits: Tensor, labels: Tensor, weights: Tensor, avg_factor: float) -> Tensor:
    """Sigmoid binary cross entropy of the sampled anchors, summed and divided by ``avg_factor``."""
    loss = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
    return (loss * weights).sum() / avg_factor


def classification_loss(logits: Tensor, labels: Tensor, avg_factor: float) -> Tensor:
    """Softmax cross entropy over ``num_classes + 1`` outputs (background last)."""
    return F.cross_entropy(logits, labels, reduction="sum") / avg_factor


def box_loss(pred: Tensor, target: Tensor, cfg: BoxLossCfg, avg_factor: float) -> Tensor:
    """Box regression loss of the positives: ``pred``/``target`` are deltas (L1, smooth L1) or
    x1y1x2y2 boxes (GIoU), shape (p, 4)."""
    if pred.shape[0] == 0:
        return pred.sum() * 0.0
    if cfg.type == "GIoULoss":
        loss = generalized_box_iou_loss(pred, target, reduction="sum", eps=1e-6)
    elif cfg.type == "SmoothL1Loss":
        loss = F.smooth_l1_loss(pred, target, beta=cfg.beta, reduction="sum")
    else:
        loss = F.l1_loss(pred, target, reduction="sum")
    return cfg.weight * loss / avg_factor


def mask_loss(logits: Tensor, labels: Tensor, targets: Tensor) -> Tensor:
    """Mean pixel-wise sigmoid BCE of each positive RoI's own-class mask logits.

    ``logits`` (p, C or 1, s, s), ``labels`` (p,) 0-based, ``targets`` (p, s, s) in {0, 1}.
    """
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    channel = labels if logits.shape[1] > 1 else torch.zeros_like(labels)
    own = logits[torch.arange(logits.shape[0]), channel]
    return F.binary_cross_entropy_with_logits(own, targets, reduction="mean")
