"""COCO box / mask AP of a float ``Detector`` through the project's inference path: decode,
``preprocess``, the Detector forward at batch 1, ``postprocess``, ``evaluate_coco``."""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm import tqdm

from repq_export.data.coco import CocoDataset
from repq_export.data.coco_results import to_coco_results
from repq_export.data.images import read_image
from repq_export.data.postprocess import postprocess
from repq_export.data.transforms import PreprocessSettings, preprocess
from repq_export.evaluation.coco_eval import evaluate_coco
from repq_export.models.detector import Detector


@torch.no_grad()
def evaluate_detector(
    detector: Detector,
    ann_file: str | Path,
    img_dir: str | Path,
    settings: PreprocessSettings,
    progress: bool = True,
) -> dict[str, float]:
    """``evaluate_coco`` metrics (fractions) of ``detector`` on every image of ``ann_file``."""
    dataset = CocoDataset(ann_file, img_dir)
    detector.eval()
    bbox_results, segm_results = [], []
    for info, path in tqdm(dataset, desc="eval", disable=not progress, dynamic_ncols=True):
        prep = preprocess(read_image(path), **vars(settings))
        outputs = detector(prep.tensor, prep.img_hw_tensor)
        dets = postprocess(*outputs, prep)
        boxes, segms = to_coco_results(dets, info["id"], dataset.cat_ids)
        bbox_results += boxes
        segm_results += segms
    return evaluate_coco(dataset, bbox_results, segm_results)
