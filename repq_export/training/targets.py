"""Training targets with the semantics of mmdet 2.11: ``MaxIoUAssigner``, ``RandomSampler``,
anchor / RoI box targets and RoI mask targets.

Assignment codes follow mmdet: ``gt_inds[i]`` is -1 (ignored), 0 (negative) or ``k + 1``
(positive, matched to ground-truth box ``k``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torchvision.ops import box_iou, roi_align

from repq_export.models.box_coder import DeltaXYWHBoxCoder


@dataclass(frozen=True)
class AssignerCfg:
    """``MaxIoUAssigner`` settings (mmdet train_cfg ``assigner``)."""

    pos_iou_thr: float
    neg_iou_thr: float
    min_pos_iou: float
    match_low_quality: bool = True
    gt_max_assign_all: bool = True


@dataclass(frozen=True)
class SamplerCfg:
    """``RandomSampler`` settings (mmdet train_cfg ``sampler``)."""

    num: int
    pos_fraction: float
    add_gt_as_proposals: bool


def assign_max_iou(boxes: Tensor, gt_boxes: Tensor, cfg: AssignerCfg) -> Tensor:
    """Ground-truth index codes (n,) int64 of ``boxes`` (n, 4) against ``gt_boxes`` (k, 4).

    Negative below ``neg_iou_thr``, positive at or above ``pos_iou_thr``; then, with
    ``match_low_quality``, each ground truth also claims the boxes of its highest IoU (all of
    them, later ground truths winning) if that IoU reaches ``min_pos_iou``.
    """
    n = boxes.shape[0]
    if gt_boxes.shape[0] == 0:
        return torch.zeros(n, dtype=torch.long)
    gt_inds = torch.full((n,), -1, dtype=torch.long)
    if n == 0:
        return gt_inds
    overlaps = box_iou(gt_boxes, boxes)  # (k, n)
    max_overlaps, argmax = overlaps.max(dim=0)
    gt_inds[(max_overlaps >= 0) & (max_overlaps < cfg.neg_iou_thr)] = 0
    pos = max_overlaps >= cfg.pos_iou_thr
    gt_inds[pos] = argmax[pos] + 1
    if cfg.match_low_quality:
        gt_max, gt_argmax = overlaps.max(dim=1)
        for i in range(gt_boxes.shape[0]):
            if gt_max[i] >= cfg.min_pos_iou:
                if cfg.gt_max_assign_all:
                    gt_inds[overlaps[i] == gt_max[i]] = i + 1
                else:
                    gt_inds[gt_argmax[i]] = i + 1
    return gt_inds


def _random_choice(inds: Tensor, num: int, generator: torch.Generator) -> Tensor:
    """``num`` of ``inds`` drawn without replacement (all of them if there are not more)."""
    if inds.numel() <= num:
        return inds
    return inds[torch.randperm(inds.numel(), generator=generator)[:num]]


@dataclass
class SampledBoxes:
    """A sampled set of boxes of one image: positives first, then negatives."""

    boxes: Tensor  # (p + q, 4)
    pos_gt_inds: Tensor  # (p,) 0-based ground-truth index of each positive
    num_pos: int
    is_gt: Tensor  # (p + q,) bool: the box is a ground truth added as a proposal

    @property
    def pos_boxes(self) -> Tensor:
        return self.boxes[: self.num_pos]


def sample_indices(gt_inds: Tensor, cfg: SamplerCfg, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """mmdet ``RandomSampler``: up to ``num * pos_fraction`` random positive indices, then random
    negative indices filling ``num``."""
    pos = _random_choice(torch.nonzero(gt_inds > 0).squeeze(1), int(cfg.num * cfg.pos_fraction), generator)
    neg = _random_choice(torch.nonzero(gt_inds == 0).squeeze(1), cfg.num - pos.numel(), generator)
    return pos, neg


def sample_random(
    boxes: Tensor, gt_boxes: Tensor, gt_inds: Tensor, cfg: SamplerCfg, generator: torch.Generator
) -> SampledBoxes:
    """Sample RoIs of one image; with ``add_gt_as_proposals`` the ground truths are first
    prepended to ``boxes`` as positives of themselves (so every ground truth can be drawn)."""
    is_gt = torch.zeros(boxes.shape[0], dtype=torch.bool)
    if cfg.add_gt_as_proposals and gt_boxes.shape[0] > 0:
        boxes = torch.cat([gt_boxes, boxes])
        gt_inds = torch.cat([torch.arange(1, gt_boxes.shape[0] + 1), gt_inds])
        is_gt = torch.cat([torch.ones(gt_boxes.shape[0], dtype=torch.bool), is_gt])
    pos, neg = sample_indices(gt_inds, cfg, generator)
    keep = torch.cat([pos, neg])
    return SampledBoxes(boxes[keep], gt_inds[pos] - 1, pos.numel(), is_gt[keep])


def inside_flags(anchors: Tensor, valid: Tensor, img_hw: tuple[int, int], allowed_border: int) -> Tensor:
    """mmdet ``anchor_inside_flags``: valid anchors that also lie within ``allowed_border`` pixels
    of the image (all valid anchors when ``allowed_border < 0``)."""
    if allowed_border < 0:
        return valid
    h, w = img_hw
    return (valid & (anchors[:, 0] >= -allowed_border) & (anchors[:, 1] >= -allowed_border)
            & (anchors[:, 2] < w + allowed_border) & (anchors[:, 3] < h + allowed_border))


def valid_anchor_flags(feat_hw: tuple[int, int], pad_hw: tuple[int, int], stride: int, num_anchors: int) -> Tensor:
    """mmdet ``AnchorGenerator.valid_flags`` of one level: anchors whose cell lies inside the
    image's own padded area (not the extra batch padding), in (y, x, anchor) order."""
    feat_h, feat_w = feat_hw
    valid_h = min(-(-pad_hw[0] // stride), feat_h)
    valid_w = min(-(-pad_hw[1] // stride), feat_w)
    ys = torch.arange(feat_h) < valid_h
    xs = torch.arange(feat_w) < valid_w
    flags = ys[:, None] & xs[None, :]
    return flags.reshape(-1, 1).expand(-1, num_anchors).reshape(-1)


@dataclass
class AnchorTargets:
    """RPN targets of one image over all anchors (levels concatenated)."""

    labels: Tensor  # (n,) float: 1 positive, 0 negative
    weights: Tensor  # (n,) float: 1 where sampled
    deltas: Tensor  # (n, 4) regression targets (valid where pos_mask)
    pos_mask: Tensor  # (n,) bool


def anchor_targets(
    anchors: Tensor,
    flags: Tensor,
    gt_boxes: Tensor,
    assigner: AssignerCfg,
    sampler: SamplerCfg,
    coder: DeltaXYWHBoxCoder,
    generator: torch.Generator,
) -> AnchorTargets:
    """Assign and sample the anchors inside ``flags``; encode the positives' boxes."""
    n = anchors.shape[0]
    inside = torch.nonzero(flags).squeeze(1)
    gt_inds = assign_max_iou(anchors[inside], gt_boxes, assigner)
    pos, neg = sample_indices(gt_inds, sampler, generator)
    labels = torch.zeros(n)
    weights = torch.zeros(n)
    deltas = torch.zeros(n, 4)
    pos_mask = torch.zeros(n, dtype=torch.bool)
    pos_all, neg_all = inside[pos], inside[neg]
    labels[pos_all] = 1.0
    weights[pos_all] = 1.0
    weights[neg_all] = 1.0
    pos_mask[pos_all] = True
    if pos.numel():
        deltas[pos_all] = coder.encode(anchors[pos_all], gt_boxes[gt_inds[pos] - 1])
    return AnchorTargets(labels, weights, deltas, pos_mask)


def mask_targets(pos_boxes: Tensor, pos_gt_inds: Tensor, gt_masks: Tensor, size: int) -> Tensor:
    """Binary (p, size, size) float targets: each ground-truth mask (k, H, W) cut out by its
    positive box with aligned RoIAlign and thresholded at 0.5 (mmdet ``BitmapMasks.crop_and_resize``)."""
    if pos_boxes.shape[0] == 0:
        return pos_boxes.new_zeros(0, size, size)
    rois = torch.cat([pos_gt_inds[:, None].to(pos_boxes.dtype), pos_boxes], dim=1)
    crops = roi_align(gt_masks[:, None].float(), rois, (size, size), 1.0, 0, aligned=True)
    return (crops[:, 0] >= 0.5).float()
