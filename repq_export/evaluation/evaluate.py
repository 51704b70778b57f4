"""Score a run over a COCO-format dataset: the one scoring path of every stage (runs come from `image_loop`)."""

from __future__ import annotations

from ..data.coco import CocoDataset
from ..data.coco_results import to_coco_results
from .coco_eval import evaluate_coco
from .image_loop import DatasetRun


def coco_results(run: DatasetRun, dataset: CocoDataset) -> tuple[list[dict], list[dict]]:
    """COCO result records (bbox, segm) of a run, as mmdet writes them."""
    bbox, segm = [], []
    for image in run.images:
        b, s = to_coco_results(image.dets, image.image_id, dataset.cat_ids)
        bbox += b
        segm += s
    return bbox, segm


def score_run(run: DatasetRun, dataset: CocoDataset, metrics: tuple[str, ...] = ("bbox", "segm")) -> dict[str, float]:
    """COCO AP of a run over exactly the images it ran on (fractions, mmdet's key names)."""
    bbox, segm = coco_results(run, dataset)
    return evaluate_coco(dataset.coco, bbox, segm, metrics=metrics, img_ids=run.image_ids)
