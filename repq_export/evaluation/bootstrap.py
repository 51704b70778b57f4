"""COCO AP over a resampled set of images, and the paired bootstrap over images built on it.

pycocotools matches detections to ground truth image by image (`COCOeval.evaluate`) and only then
pools the images (`accumulate`). So AP over any multiset of images follows from the per-image
matches by pooling them with weights (how often each image was drawn), without re-matching: that
is what makes a bootstrap of AP cheap. With all weights 1 it is pycocotools' mAP (asserted in the
tests).
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

MAX_DET = 100  # COCO mAP: the first 100 detections of each image
CONFIDENCE = 0.95


@dataclass
class CategoryMatches:
    """One category's detections of every image at COCO's 10 IoU thresholds, area range 'all'."""

    image: np.ndarray  # (D,) index of the image of each detection, detections sorted by score (stable)
    matched: np.ndarray  # (T, D) bool: matched to a ground truth
    ignored: np.ndarray  # (T, D) bool: matched to an ignored ground truth
    gt_per_image: np.ndarray  # (I,) ground truths that count (not ignored)


def per_image_matches(coco_gt: COCO, results: list[dict], iou_type: str,
                      img_ids: Sequence[int]) -> list[CategoryMatches]:
    """pycocotools' per-image matching of ``results`` on ``img_ids``, one entry per category."""
    img_ids = list(img_ids)
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes([dict(r) for r in results]) if results else COCO()
        evaluator = COCOeval(coco_gt, coco_dt, iou_type)
        evaluator.params.catIds = coco_gt.getCatIds()
        evaluator.params.imgIds = img_ids
        evaluator.params.maxDets = [MAX_DET]
        if results:
            evaluator.evaluate()
    n_img, n_area, thresholds = len(img_ids), len(evaluator.params.areaRng), len(evaluator.params.iouThrs)
    out = []
    for k, cat in enumerate(evaluator.params.catIds):
        gts = np.zeros(n_img, dtype=np.int64)
        image, scores, matched, ignored = [], [], [], []
        for i, img in enumerate(img_ids):
            if not results:
                gts[i] = sum(1 for a in coco_gt.imgToAnns[img] if a["category_id"] == cat and not a.get("iscrowd"))
                continue
            e = evaluator.evalImgs[k * n_area * n_img + i]  # area range 0 = 'all'
            if e is None:
                continue
            gts[i] = int(np.count_nonzero(np.asarray(e["gtIgnore"]) == 0))
            d = len(e["dtScores"][:MAX_DET])
            image.append(np.full(d, i))
            scores.append(np.asarray(e["dtScores"][:MAX_DET], dtype=np.float64))
            matched.append(np.asarray(e["dtMatches"])[:, :MAX_DET] > 0)
            ignored.append(np.asarray(e["dtIgnore"])[:, :MAX_DET].astype(bool))
        if scores:
            order = np.argsort(-np.concatenate(scores), kind="mergesort")
            out.append(CategoryMatches(np.concatenate(image)[order], np.concatenate(matched, axis=1)[:, order],
                                       np.concatenate(ignored, axis=1)[:, order], gts))
        else:
            out.append(CategoryMatches(np.zeros(0, dtype=np.int64), np.zeros((thresholds, 0), dtype=bool),
                                       np.zeros((thresholds, 0), dtype=bool), gts))
    return out


def weighted_ap(categories: list[CategoryMatches], weights: np.ndarray) -> float:
    """COCO mAP (IoU .5:.95, area 'all', 100 detections) over the images drawn ``weights[i]`` times each."""
    recall_points = np.linspace(0.0, 1.0, 101)
    per_category = []
    for c in categories:
        positives = float(weights @ c.gt_per_image)
        if positives == 0:
            continue  # pycocotools leaves such a category out of the mean
        thresholds, dets = c.matched.shape
        if dets == 0:
            per_category.append(0.0)
            continue
        w = weights[c.image]
        tp = np.cumsum((c.matched & ~c.ignored) * w, axis=1)
        fp = np.cumsum((~c.matched & ~c.ignored) * w, axis=1)
        precision = np.maximum.accumulate((tp / (tp + fp + np.spacing(1)))[:, ::-1], axis=1)[:, ::-1]
        recall = tp / positives
        index = np.stack([np.searchsorted(recall[t], recall_points, side="left") for t in range(thresholds)])
        q = np.where(index < dets, np.take_along_axis(precision, np.minimum(index, dets - 1), axis=1), 0.0)
        per_category.append(q.mean())
    return float(np.mean(per_category)) if per_category else -1.0


def weighted_aps(categories: list[CategoryMatches], weights: np.ndarray) -> np.ndarray:
    """`weighted_ap` of each row of ``weights`` (samples, images)."""
    return np.array([weighted_ap(categories, w) for w in weights])


def resample_weights(images: int, samples: int, seed: int) -> np.ndarray:
    """(samples, images) bootstrap draws: how often each image is drawn, ``images`` draws a sample."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(images, np.full(images, 1.0 / images), size=samples).astype(np.float64)


def interval(values: np.ndarray, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """The central ``confidence`` percentile interval of bootstrap ``values``."""
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def bootstrap(statistic: Callable[[np.ndarray], float], weights: np.ndarray) -> np.ndarray:
    """``statistic`` (of per-image weights) on every resample."""
    return np.array([statistic(w) for w in weights])
