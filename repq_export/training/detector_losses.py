"""The training-time forward of a ``Detector``: its losses on a batch, as mmdet 2.11 computes them
for Mask R-CNN (``StandardRoIHead``) and Cascade Mask R-CNN (``CascadeRoIHead``).

Built from the detector's own layers (backbone, neck, ``rpn_head.forward_single``, the heads and
RoI extractors), so training exercises exactly the modules that inference and export use; the
RPN proposals come from ``rpn_head.proposals`` with its test-time settings, one image at a time.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from repq_export.models.detector import Detector
from repq_export.models.roi_extractor import MultiLevelRoIAlign
from repq_export.models.roi_heads import CascadeRoIHead, StandardRoIHead, select_class_deltas
from repq_export.models.rpn_head import RPNHead
from repq_export.training.data import Batch
from repq_export.training.losses import box_loss, classification_loss, mask_loss, objectness_loss
from repq_export.training.settings import StageCfg, TrainCfg
from repq_export.training.targets import (
    SampledBoxes,
    anchor_targets,
    assign_max_iou,
    inside_flags,
    mask_targets,
    sample_random,
    valid_anchor_flags,
)


def detector_losses(detector: Detector, batch: Batch, cfg: TrainCfg, generator: torch.Generator) -> dict[str, Tensor]:
    """All losses of one batch, keyed like mmdet's log (``loss_rpn_cls``, ``s0.loss_cls``, ...)."""
    feats = detector.extract_feat(batch.imgs)
    losses, proposals = rpn_losses(detector.rpn_head, feats, batch, cfg, generator)
    roi_head = detector.roi_head
    if isinstance(roi_head, CascadeRoIHead):
        losses.update(cascade_losses(roi_head, feats, proposals, batch, cfg, generator))
    elif isinstance(roi_head, StandardRoIHead):
        losses.update(stage_losses(roi_head, 0, feats, proposals, batch, cfg.stages[0], generator)[0])
    else:
        raise TypeError(f"unsupported RoI head {type(roi_head).__name__}")
    return losses


def image_feats(feats: Sequence[Tensor], i: int) -> list[Tensor]:
    """The feature maps of the i-th image of the batch (RoI extractors work on one image)."""
    return [f[i : i + 1] for f in feats]


# ----------------------------------------------------------------------------- RPN


def rpn_losses(
    head: RPNHead, feats: Sequence[Tensor], batch: Batch, cfg: TrainCfg, generator: torch.Generator
) -> tuple[dict[str, Tensor], list[Tensor]]:
    """Objectness and box losses over sampled anchors, and each image's proposals (no gradient)."""
    outs = [head.forward_single(x) for x in feats]
    num_anchors = head.anchor_generator.num_base_anchors
    logits = torch.cat([c.permute(0, 2, 3, 1).reshape(c.shape[0], -1) for c, _ in outs], dim=1)
    deltas = torch.cat([r.permute(0, 2, 3, 1).reshape(r.shape[0], -1, 4) for _, r in outs], dim=1)
    sizes = [(c.shape[2], c.shape[3]) for c, _ in outs]
    anchors = torch.cat(head.anchor_generator.grid_anchors(sizes))

    targets = []
    for i in range(len(batch)):
        valid = torch.cat([valid_anchor_flags(hw, batch.pad_hw[i], stride, num_anchors)
                           for hw, stride in zip(sizes, head.anchor_generator.strides)])
        flags = inside_flags(anchors, valid, batch.img_hw[i], cfg.allowed_border)
        targets.append(anchor_targets(anchors, flags, batch.gt_boxes[i], cfg.rpn_assigner,
                                      cfg.rpn_sampler, head.bbox_coder, generator))
    labels = torch.stack([t.labels for t in targets])
    weights = torch.stack([t.weights for t in targets])
    pos = torch.stack([t.pos_mask for t in targets])
    delta_targets = torch.stack([t.deltas for t in targets])
    num_samples = max(float(weights.sum()), 1.0)
    losses = {
        "loss_rpn_cls": objectness_loss(logits, labels, weights, num_samples),
        "loss_rpn_bbox": box_loss(deltas[pos], delta_targets[pos], cfg.rpn_box_loss, num_samples),
    }
    with torch.no_grad():
        proposals = [
            head.proposals([c[i : i + 1] for c, _ in outs], [r[i : i + 1] for _, r in outs],
                           torch.tensor(batch.img_hw[i], dtype=torch.float32))[0]
            for i in range(len(batch))
        ]
    return losses, proposals


# ----------------------------------------------------------------------------- R-CNN


def sample_rois(
    proposals: list[Tensor], batch: Batch, stage: StageCfg, generator: torch.Generator
) -> list[SampledBoxes]:
    """Assign each image's proposals to its ground truths and sample the RoIs to train on."""
    sampled = []
    for boxes, gt_boxes in zip(proposals, batch.gt_boxes):
        gt_inds = assign_max_iou(boxes, gt_boxes, stage.assigner)
        sampled.append(sample_random(boxes, gt_boxes, gt_inds, stage.sampler, generator))
    return sampled


def extract(extractor: MultiLevelRoIAlign, feats: Sequence[Tensor], boxes: list[Tensor]) -> Tensor:
    """RoI features of every image's boxes, concatenated in image order."""
    return torch.cat([extractor(image_feats(feats, i), b) for i, b in enumerate(boxes)])


def stage_losses(
    roi_head: StandardRoIHead | CascadeRoIHead,
    index: int,
    feats: Sequence[Tensor],
    proposals: list[Tensor],
    batch: Batch,
    stage: StageCfg,
    generator: torch.Generator,
) -> tuple[dict[str, Tensor], list[Tensor]]:
    """Class, box and mask losses of one R-CNN stage (unweighted), and the RoIs regressed by this
    stage (no gradient, ground truths added as proposals removed) for the next cascade stage."""
    cascade = isinstance(roi_head, CascadeRoIHead)
    bbox_head = roi_head.bbox_head[index] if cascade else roi_head.bbox_head
    mask_head = roi_head.mask_head[index] if cascade else roi_head.mask_head
    coder = roi_head.bbox_coders[index] if cascade else roi_head.bbox_coder

    sampled = sample_rois(proposals, batch, stage, generator)
    rois = torch.cat([s.boxes for s in sampled])
    cls_logits, deltas = bbox_head(extract(roi_head.bbox_roi_extractor, feats, [s.boxes for s in sampled]))

    labels = torch.cat([_roi_labels(s, gt, bbox_head.num_classes) for s, gt in zip(sampled, batch.gt_labels)])
    pos = torch.cat([torch.arange(len(s.boxes)) < s.num_pos for s in sampled])
    pos_gt = [gt[s.pos_gt_inds] for s, gt in zip(sampled, batch.gt_boxes)]
    pos_labels = labels[pos]
    pos_deltas = deltas[pos] if bbox_head.reg_class_agnostic else select_class_deltas(deltas[pos], pos_labels)
    num_samples = max(float(rois.shape[0]), 1.0)
    if stage.box_loss.on_decoded_boxes:
        pred, target = coder.decode(rois[pos], pos_deltas), torch.cat(pos_gt)
    else:
        pred, target = pos_deltas, coder.encode(rois[pos], torch.cat(pos_gt))

    pos_boxes = [s.pos_boxes for s in sampled]
    mask_logits = mask_head(extract(roi_head.mask_roi_extractor, feats, pos_boxes))
    mask_target = torch.cat([mask_targets(s.pos_boxes, s.pos_gt_inds, m, stage.mask_size)
                             for s, m in zip(sampled, batch.gt_masks)])
    losses = {
        "loss_cls": classification_loss(cls_logits, labels, num_samples),
        "loss_bbox": box_loss(pred, target, stage.box_loss, num_samples),
        "loss_mask": mask_loss(mask_logits, pos_labels, mask_target),
    }
    last = not cascade or index == roi_head.num_stages - 1
    refined = [] if last else _refine(roi_head, index, sampled, cls_logits, deltas, labels, batch)
    return losses, refined


def _roi_labels(sampled: SampledBoxes, gt_labels: Tensor, num_classes: int) -> Tensor:
    """Class targets of the sampled RoIs: the matched ground truth's label, background last."""
    labels = torch.full((len(sampled.boxes),), num_classes, dtype=torch.long)
    labels[: sampled.num_pos] = gt_labels[sampled.pos_gt_inds]
    return labels


@torch.no_grad()
def _refine(
    roi_head: CascadeRoIHead,
    index: int,
    sampled: list[SampledBoxes],
    cls_logits: Tensor,
    deltas: Tensor,
    labels: Tensor,
    batch: Batch,
) -> list[Tensor]:
    """Next-stage RoIs (mmdet ``refine_bboxes``): regress each RoI with its target class, or its
    predicted foreground class for background RoIs; clip; drop the added ground truths."""
    num_classes = roi_head.bbox_head[index].num_classes
    labels = torch.where(labels == num_classes, cls_logits[:, :-1].argmax(dim=1), labels)
    if not roi_head.bbox_head[index].reg_class_agnostic:
        deltas = select_class_deltas(deltas, labels)
    refined, start = [], 0
    for s, hw in zip(sampled, batch.img_hw):
        end = start + len(s.boxes)
        boxes = roi_head.bbox_coders[index].decode(s.boxes, deltas[start:end], torch.tensor(hw, dtype=torch.float32))
        refined.append(boxes[~s.is_gt])
        start = end
    return refined


def cascade_losses(
    roi_head: CascadeRoIHead,
    feats: Sequence[Tensor],
    proposals: list[Tensor],
    batch: Batch,
    cfg: TrainCfg,
    generator: torch.Generator,
) -> dict[str, Tensor]:
    """Losses of every cascade stage, weighted by ``stage_loss_weights``, keyed ``s{i}.loss_*``."""
    losses = {}
    for i, stage in enumerate(cfg.stages):
        stage_loss, proposals = stage_losses(roi_head, i, feats, proposals, batch, stage, generator)
        losses.update({f"s{i}.{k}": v * stage.loss_weight for k, v in stage_loss.items()})
    return losses
