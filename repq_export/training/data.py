"""Training images and their annotations (boxes, labels, instance masks) from a COCO-format set,
through the same resize / normalize / pad as inference (``repq_export.data.transforms``), plus
mmdet's training-only random horizontal flip; batches are zero-padded to a common size.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import Tensor

from repq_export.data.coco import CocoDataset
from repq_export.data.images import read_image
from repq_export.data.transforms import padded_size, preprocess


@dataclass
class TrainSample:
    """One resized, normalized training image (3, Hp, Wp) padded to 32 and its targets in
    resized-image pixels."""

    img: Tensor
    img_hw: tuple[int, int]
    gt_boxes: Tensor  # (k, 4) float32 x1y1x2y2
    gt_labels: Tensor  # (k,) int64 0-based
    gt_masks: Tensor  # (k, h, w) uint8 at the resized size


@dataclass
class Batch:
    """Images zero-padded to a common (H, W) and per-image targets."""

    imgs: Tensor  # (B, 3, H, W)
    img_hw: list[tuple[int, int]]  # resized size of each image before padding
    pad_hw: list[tuple[int, int]]  # each image's own padded size (multiple of size_divisor)
    gt_boxes: list[Tensor]
    gt_labels: list[Tensor]
    gt_masks: list[Tensor]

    def __len__(self) -> int:
        return self.imgs.shape[0]


class TrainSet:
    """The annotated images of a COCO annotation file, in file order, ready for training.

    Crowd regions and boxes under one pixel wide or high are left out, as mmdet does.
    """

    def __init__(
        self,
        ann_file: str | Path,
        img_dir: str | Path,
        scale: tuple[int, int],
        mean: tuple[float, float, float],
        std: tuple[float, float, float],
        to_rgb: bool = True,
        size_divisor: int = 32,
    ) -> None:
        self.coco_set = CocoDataset(ann_file, img_dir)
        self.preprocess_args = dict(scale=scale, mean=mean, std=std, to_rgb=to_rgb, size_divisor=size_divisor)
        self.size_divisor = size_divisor

    @property
    def classes(self) -> tuple[str, ...]:
        return self.coco_set.classes

    def __len__(self) -> int:
        return len(self.coco_set)

    def landscape(self) -> list[bool]:
        """Whether each image is wider than high: mmdet's ``GroupSampler`` batches the two groups
        separately, so a batch needs little padding."""
        return [info["width"] > info["height"] for info, _ in self.coco_set]

    def _annotations(self, image_id: int) -> list[dict]:
        coco = self.coco_set.coco
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[image_id]))
        return [a for a in anns if not a.get("iscrowd", 0) and a["bbox"][2] >= 1 and a["bbox"][3] >= 1]

    def load(self, index: int, flip: bool) -> TrainSample:
        """The index-th image, optionally flipped left-right, with its targets."""
        info, path = self.coco_set[index]
        img = read_image(path)
        anns = self._annotations(info["id"])
        masks = [self.coco_set.coco.annToMask(a) for a in anns]
        boxes = np.array([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                          for a in anns], dtype=np.float32).reshape(-1, 4)
        w = img.shape[1]
        if flip:
            img = img[:, ::-1]
            masks = [m[:, ::-1] for m in masks]
            boxes = np.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], axis=1)
        prep = preprocess(np.ascontiguousarray(img), **self.preprocess_args)
        h_new, w_new = prep.img_hw
        boxes = boxes * prep.scale_factor
        boxes[:, 0::2] = boxes[:, 0::2].clip(0, w_new)
        boxes[:, 1::2] = boxes[:, 1::2].clip(0, h_new)
        resized = [cv2.resize(np.ascontiguousarray(m), (w_new, h_new), interpolation=cv2.INTER_NEAREST) for m in masks]
        gt_masks = torch.from_numpy(np.stack(resized)) if resized else torch.zeros(0, h_new, w_new, dtype=torch.uint8)
        labels = [self.coco_set.cat2label[a["category_id"]] for a in anns]
        return TrainSample(prep.tensor[0], prep.img_hw, torch.from_numpy(boxes.astype(np.float32)),
                           torch.tensor(labels, dtype=torch.int64), gt_masks)

    def batch(self, indices: list[int], flips: list[bool]) -> Batch:
        """A zero-padded batch of the given images."""
        return collate([self.load(i, f) for i, f in zip(indices, flips)], self.size_divisor)


def collate(samples: list[TrainSample], size_divisor: int = 32) -> Batch:
    """Stack samples into one tensor, padding bottom/right with zeros (zero = the mean colour)."""
    height = max(s.img.shape[1] for s in samples)
    width = max(s.img.shape[2] for s in samples)
    imgs = torch.zeros(len(samples), 3, height, width)
    for i, s in enumerate(samples):
        imgs[i, :, : s.img.shape[1], : s.img.shape[2]] = s.img
    return Batch(
        imgs=imgs,
        img_hw=[s.img_hw for s in samples],
        pad_hw=[padded_size(*s.img_hw, size_divisor) for s in samples],
        gt_boxes=[s.gt_boxes for s in samples],
        gt_labels=[s.gt_labels for s in samples],
        gt_masks=[s.gt_masks for s in samples],
    )
