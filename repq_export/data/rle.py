"""COCO run-length encoding of binary masks (pycocotools), in the JSON-ready form results carry."""

from __future__ import annotations

import numpy as np
import pycocotools.mask as mask_util


def mask_to_rle(mask: np.ndarray) -> dict:
    """COCO RLE of a binary (H, W) mask with a str ``counts``, ready for JSON."""
    rle = mask_util.encode(np.asfortranarray(mask[:, :, None], dtype=np.uint8))[0]
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}
