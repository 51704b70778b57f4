"""Image decoding exactly as the reference test pipeline does it (mmdet 2.11 LoadImageFromFile).

mmdet reads the file's bytes and decodes them with ``cv2.imdecode(..., IMREAD_COLOR)``; that is
what we do too, so every runner sees the same pixels as the reference: EXIF orientation applied,
grayscale replicated to three channels, alpha dropped, palettes and CMYK converted to BGR,
16-bit samples reduced to 8 bits (the high byte).
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np

from repq_export.errors import UserError

if TYPE_CHECKING:
    from repq_export.data.transforms import Preprocessed


def read_image(path: str | Path) -> np.ndarray:
    """Decode an image file into an (H, W, 3) uint8 BGR array, as mmcv.imfrombytes(flag='color')."""
    try:
        content = Path(path).read_bytes()
    except OSError as err:
        raise UserError(f"{path}: cannot read image ({err.strerror or err})") from None
    if not content:
        raise UserError(f"{path}: cannot decode image (empty file)")
    try:
        img = cv2.imdecode(np.frombuffer(content, np.uint8), cv2.IMREAD_COLOR)
    except cv2.error:
        img = None
    if img is None:
        raise UserError(f"{path}: cannot decode image (not a format OpenCV reads)")
    return img


def preprocess_file(path: str | Path, settings) -> "Preprocessed":
    """Read and preprocess one image file; a problem with it is a UserError naming the file."""
    from repq_export.data.transforms import preprocess

    img = read_image(path)
    try:
        return preprocess(img, **vars(settings))
    except UserError as exc:
        raise UserError(f"{path}: {exc}") from None


def check_calibration_image(path: str | Path) -> None:
    """Refuse an image that cannot calibrate anything: one flat colour (every pixel the same)."""
    img = read_image(path)
    if int(img.min()) == int(img.max()):
        h, w = img.shape[:2]
        raise UserError(f"{path}: calibration image of {w}x{h} pixels is one flat colour (value {int(img.min())}); "
                        "the quantizers would see constant inputs: use real pictures")
