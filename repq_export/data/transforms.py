"""Test-time preprocessing of the reference (mmdet 2.11 / mmcv 1.x): keep-ratio resize,
normalize, pad to a multiple of 32. Written once here and shared by every runner, so backend
parity is about the network alone.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import torch

from repq_export.errors import UserError

COCO_SCALE = (1333, 800)
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)


@dataclass(frozen=True)
class Preprocessed:
    """One image ready for the network, plus what postprocessing needs to undo the resize."""

    tensor: torch.Tensor  # [1, 3, Hp, Wp] float32, normalized, zero-padded bottom/right
    img_hw: tuple[int, int]  # (h, w) of the resized image before padding
    ori_hw: tuple[int, int]  # (H, W) of the decoded image
    scale_factor: np.ndarray  # float32 [w_scale, h_scale, w_scale, h_scale]

    @property
    def pad_hw(self) -> tuple[int, int]:
        """(Hp, Wp) of the padded tensor."""
        return int(self.tensor.shape[2]), int(self.tensor.shape[3])

    @property
    def img_hw_tensor(self) -> torch.Tensor:
        """``img_hw`` as the float32 tensor [2] that the detector's forward takes."""
        return torch.tensor(self.img_hw, dtype=torch.float32)


def rescale_size(w: int, h: int, scale: tuple[int, int]) -> tuple[int, int]:
    """New (w, h) fitting the long side into max(scale) and the short side into min(scale).

    mmcv.rescale_size: one factor for both sides, each side rounded half up.
    """
    factor = min(max(scale) / max(h, w), min(scale) / min(h, w))
    return int(w * float(factor) + 0.5), int(h * float(factor) + 0.5)


def resize_keep_ratio(img: np.ndarray, scale: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Bilinear keep-ratio resize (mmcv.imrescale, cv2 backend) and mmdet's float32 scale factor.

    The scale factor is measured on the integer output size (new_w / w, new_h / h), as mmdet does,
    not the factor used to compute that size.
    """
    h, w = img.shape[:2]
    new_w, new_h = rescale_size(w, h, scale)
    if new_w < 1 or new_h < 1:
        raise UserError(f"image of {w}x{h} pixels shrinks to nothing at scale {scale} (one side would be "
                        "0 pixels): too thin for this model")
    resized = cv2.resize(img, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    w_scale, h_scale = new_w / w, new_h / h
    return resized, np.array([w_scale, h_scale, w_scale, h_scale], dtype=np.float32)


def normalize(
    img: np.ndarray, mean: Sequence[float], std: Sequence[float], to_rgb: bool = True
) -> np.ndarray:
    """(img - mean) * (1 / std) as float32, optionally BGR -> RGB (mmcv.imnormalize).

    mmdet stores mean/std as float32; cv2 then does the scalar arithmetic in double and rounds
    once to float32. Doing the same here reproduces its values bit for bit.
    """
    mean64 = np.float64(np.asarray(mean, dtype=np.float32))
    stdinv64 = 1.0 / np.float64(np.asarray(std, dtype=np.float32))
    if to_rgb:
        img = img[..., ::-1]
    return ((img.astype(np.float64) - mean64) * stdinv64).astype(np.float32)


def padded_size(h: int, w: int, divisor: int) -> tuple[int, int]:
    """(h, w) rounded up to multiples of ``divisor`` (mmcv.impad_to_multiple)."""
    return -(-h // divisor) * divisor, -(-w // divisor) * divisor


def preprocess(
    img_bgr: np.ndarray,
    scale: tuple[int, int] = COCO_SCALE,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    to_rgb: bool = True,
    size_divisor: int = 32,
) -> Preprocessed:
    """Resize, normalize and zero-pad an (H, W, 3) uint8 BGR image into a [1, 3, Hp, Wp] tensor."""
    if img_bgr.ndim != 3 or img_bgr.shape[2] != 3 or img_bgr.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 image, got {img_bgr.shape} {img_bgr.dtype}")
    if len(scale) != 2 or min(scale) <= 0 or size_divisor <= 0:
        raise ValueError(f"bad scale {scale} or size_divisor {size_divisor}")
    ori_h, ori_w = img_bgr.shape[:2]
    resized, scale_factor = resize_keep_ratio(img_bgr, scale)
    chw = normalize(resized, mean, std, to_rgb).transpose(2, 0, 1)
    h, w = chw.shape[1:]
    pad_h, pad_w = padded_size(h, w, size_divisor)
    tensor = torch.zeros((1, 3, pad_h, pad_w), dtype=torch.float32)
    tensor[0, :, :h, :w] = torch.from_numpy(np.ascontiguousarray(chw))
    return Preprocessed(tensor, (h, w), (ori_h, ori_w), scale_factor)
