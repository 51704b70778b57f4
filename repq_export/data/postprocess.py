"""Network outputs -> detections in the original image: rescale boxes, paste the 28x28 RoI masks
into the image, threshold, RLE-encode. Mask pasting follows mmdet 2.11's CPU path
(FCNMaskHead.get_seg_masks with _do_paste_mask, one box at a time) so masks match the reference.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from repq_export.data.rle import mask_to_rle
from repq_export.data.transforms import Preprocessed
from repq_export.reference_settings import MASK_THR_BINARY

Array = torch.Tensor | np.ndarray


def _cpu(x: Array, dtype: torch.dtype) -> torch.Tensor:
    """A runner's output (numpy, or a torch tensor on any device) as a CPU tensor of ``dtype``."""
    return torch.as_tensor(x).detach().to(device="cpu", dtype=dtype)


@dataclass
class Detections:
    """Detections of one image in original-image pixels (mmdet's rescale=True results)."""

    boxes: np.ndarray  # float32 [N, 4] x1, y1, x2, y2
    scores: np.ndarray  # float32 [N]
    labels: np.ndarray  # int64 [N], 0-based class index
    masks: list[dict]  # N COCO RLEs {'size': [H, W], 'counts': str}
    binary_masks: np.ndarray | None = None  # bool [N, H, W] when asked for

    def __len__(self) -> int:
        return len(self.scores)


def paste_mask(
    mask: torch.Tensor, box: torch.Tensor, img_hw: tuple[int, int]
) -> tuple[torch.Tensor, tuple[slice, slice]]:
    """Resample one RoI mask (h, w probabilities) onto the image pixels around ``box``.

    Returns the probabilities of the rows/columns that can be touched (the box widened by one
    pixel, clipped to the image) and the slices they occupy. Pixel centres (+0.5) are mapped into
    the box and sampled bilinearly with zero padding (grid_sample, align_corners=False).
    """
    img_h, img_w = img_hw
    x0, y0, x1, y1 = box.to(torch.float32)
    col0 = max(math.floor(x0.item()) - 1, 0)
    row0 = max(math.floor(y0.item()) - 1, 0)
    col1 = min(math.ceil(x1.item()) + 1, img_w)
    row1 = min(math.ceil(y1.item()) + 1, img_h)
    region = (slice(row0, max(row1, row0)), slice(col0, max(col1, col0)))
    if row1 <= row0 or col1 <= col0:
        return torch.zeros((max(row1 - row0, 0), max(col1 - col0, 0))), region
    ys = torch.arange(row0, row1, dtype=torch.float32) + 0.5
    xs = torch.arange(col0, col1, dtype=torch.float32) + 0.5
    gy = (ys - y0) / (y1 - y0) * 2 - 1
    gx = (xs - x0) / (x1 - x0) * 2 - 1
    # a zero-width box gives inf; mmdet samples those at the mask centre
    gy[torch.isinf(gy)] = 0
    gx[torch.isinf(gx)] = 0
    grid = torch.stack(torch.broadcast_tensors(gx[None, :], gy[:, None]), dim=2)
    sampled = F.grid_sample(mask[None, None].to(torch.float32), grid[None], align_corners=False)
    return sampled[0, 0], region


def postprocess(
    boxes: Array,
    scores: Array,
    labels: Array,
    masks: Array,
    prep: Preprocessed,
    mask_thr: float = MASK_THR_BINARY,
    keep_binary: bool = False,
) -> Detections:
    """Turn network outputs (torch or numpy, resized-image coordinates) into Detections.

    ``masks`` are the [N, 28, 28] sigmoid probabilities of each box's class. Boxes are divided by
    the scale factor first; each mask is pasted on the rescaled box and kept where ``>= mask_thr``.
    """
    boxes_t = _cpu(boxes, torch.float32).reshape(-1, 4) / torch.from_numpy(prep.scale_factor)
    masks_t = _cpu(masks, torch.float32)
    img_h, img_w = prep.ori_hw
    rles = []
    binary = np.zeros((len(boxes_t), img_h, img_w), dtype=bool) if keep_binary else None
    for i in range(len(boxes_t)):
        full = np.zeros((img_h, img_w), dtype=bool)
        probs, region = paste_mask(masks_t[i], boxes_t[i], (img_h, img_w))
        full[region] = (probs >= mask_thr).numpy()
        rles.append(mask_to_rle(full))
        if binary is not None:
            binary[i] = full
    return Detections(
        boxes=boxes_t.numpy(),
        scores=_cpu(scores, torch.float32).reshape(-1).clone().numpy(),  # own copies: runners may
        labels=_cpu(labels, torch.int64).reshape(-1).clone().numpy(),  # reuse output buffers
        masks=rles,
        binary_masks=binary,
    )
