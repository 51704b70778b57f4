"""Detections of one image -> COCO result records (bbox, segm), in mmdet's format and order."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from repq_export.data.postprocess import Detections


def xyxy_to_xywh(box: np.ndarray) -> list[float]:
    """[x1, y1, x2, y2] -> COCO [x, y, w, h], subtracting in double precision as mmdet does."""
    x1, y1, x2, y2 = (float(v) for v in box[:4])
    return [x1, y1, x2 - x1, y2 - y1]


def to_coco_results(
    dets: Detections, image_id: int, cat_ids: Sequence[int]
) -> tuple[list[dict], list[dict]]:
    """COCO result records (bbox, segm) of one image, in mmdet's format and order.

    Like mmdet's: grouped by class, detection order kept within a class (COCOeval breaks score
    ties by it); w = x2 - x1 in double precision; segm records carry the box and its score too
    (pycocotools then takes a segm detection's area from that box, as in the reference).
    """
    bbox_results, segm_results = [], []
    for i in np.argsort(dets.labels, kind="stable"):
        label = int(dets.labels[i])
        if not 0 <= label < len(cat_ids):
            raise ValueError(f"label {label} outside the {len(cat_ids)} categories")
        record = {
            "image_id": image_id,
            "bbox": xyxy_to_xywh(dets.boxes[i]),
            "score": float(dets.scores[i]),
            "category_id": int(cat_ids[label]),
        }
        bbox_results.append(record)
        if dets.masks:
            segm = {**record, "bbox": list(record["bbox"]), "segmentation": dict(dets.masks[i])}
            segm_results.append(segm)
    return bbox_results, segm_results
