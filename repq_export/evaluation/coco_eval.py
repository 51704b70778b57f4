"""COCO box and mask AP through pycocotools, with the reference's settings (mmdet 2.11
CocoDataset.evaluate): all images and categories of the annotation file, maxDets (100, 300, 1000).

Metrics are returned unrounded (mmdet rounds them to 3 decimals) so that parity between two
backends can be judged finer than 0.1 AP.
"""
from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from repq_export.data.coco import CocoDataset, load_coco
from repq_export.errors import UserError

METRICS = ("bbox", "segm")
MAX_DETS = (100, 300, 1000)

# The twelve COCOeval stats in order: (name, AP or AR, IoU threshold, area range, maxDets).
STATS = (
    ("mAP", "AP", None, "all", 100),  # pycocotools: maxDets 100, the others maxDets[2]
    ("mAP_50", "AP", 0.5, "all", 1000),
    ("mAP_75", "AP", 0.75, "all", 1000),
    ("mAP_s", "AP", None, "small", 1000),
    ("mAP_m", "AP", None, "medium", 1000),
    ("mAP_l", "AP", None, "large", 1000),
    ("AR@100", "AR", None, "all", 100),
    ("AR@300", "AR", None, "all", 300),
    ("AR@1000", "AR", None, "all", 1000),
    ("AR_s@1000", "AR", None, "small", 1000),
    ("AR_m@1000", "AR", None, "medium", 1000),
    ("AR_l@1000", "AR", None, "large", 1000),
)


def _as_coco(gt: str | Path | COCO | CocoDataset) -> COCO:
    """The ground truth as a pycocotools COCO index, whatever form it was given in."""
    if isinstance(gt, CocoDataset):
        return gt.coco
    if isinstance(gt, COCO):
        return gt
    return load_coco(gt)


def coco_stats(
    coco_gt: COCO, results: list[dict], iou_type: str, img_ids: Sequence[int] | None = None
) -> np.ndarray:
    """The 12 COCOeval stats of ``results`` (bbox or segm records) over ``img_ids`` (default: all
    images); all zero when there are no results."""
    if not results:
        return np.zeros(len(STATS))
    quiet = io.StringIO()
    with contextlib.redirect_stdout(quiet):
        try:
            # loadRes adds keys to the records it gets; give it copies
            coco_dt = coco_gt.loadRes([dict(r) for r in results])
        except AssertionError:
            raise UserError(f"{iou_type} results: image ids not in the annotation file") from None
        evaluator = COCOeval(coco_gt, coco_dt, iou_type)
        evaluator.params.catIds = coco_gt.getCatIds()
        evaluator.params.imgIds = coco_gt.getImgIds() if img_ids is None else list(img_ids)
        evaluator.params.maxDets = list(MAX_DETS)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return np.asarray(evaluator.stats, dtype=np.float64)


def evaluate_coco(
    gt: str | Path | COCO | CocoDataset,
    bbox_results: list[dict],
    segm_results: list[dict] | None = None,
    metrics: Sequence[str] = METRICS,
    img_ids: Sequence[int] | None = None,
) -> dict[str, float]:
    """COCO AP/AR as fractions, keyed like mmdet (``bbox_mAP``, ``bbox_mAP_50``, ``segm_AR@100``).

    ``img_ids`` limits the evaluation to those images (e.g. a run over the first few); default all.
    A stat whose area range has no ground truth is -1 (as pycocotools reports it).
    """
    coco_gt = _as_coco(gt)
    by_metric = {"bbox": bbox_results, "segm": segm_results}
    out: dict[str, float] = {}
    for metric in metrics:
        if metric not in by_metric:
            choices = ", ".join(METRICS)
            raise UserError(f"metrics: unknown metric '{metric}' (choose from {choices})")
        if by_metric[metric] is None:
            raise ValueError(f"metric '{metric}' asked for but no {metric} results given")
        stats = coco_stats(coco_gt, by_metric[metric], metric, img_ids)
        out.update({f"{metric}_{name}": float(v) for (name, *_), v in zip(STATS, stats)})
    return out


def format_ap_table(metrics: dict[str, float], metric: str) -> str:
    """The AP/AR table that COCOeval.summarize() prints, rebuilt from evaluate_coco's output."""
    lines = []
    for name, kind, iou, area, max_dets in STATS:
        title = "Average Precision" if kind == "AP" else "Average Recall"
        iou_text = "0.50:0.95" if iou is None else f"{iou:0.2f}"
        value = metrics[f"{metric}_{name}"]
        lines.append(
            f" {title:<18} ({kind}) @[ IoU={iou_text:<9} | area={area:>6} | "
            f"maxDets={max_dets:>3d} ] = {value:0.3f}"
        )
    return "\n".join(lines) + "\n"
