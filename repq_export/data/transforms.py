"""Test-time preprocessing of the reference (mmdet 2.11 / mmcv 1.x): keep-ratio resize,
normalize, pad to a multiple of 32. Written once here and shared by every runner, so backend
parity is about the network alone.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import torch

from ..errors import UserError

COCO_SCALE = (1333, 800)
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)


@dataclass(frozen=True)
class PreprocessSettings:
    """A config's test-pipeline settings; the fields are ``preprocess``'s keyword arguments
    (``preprocess(img, **vars(settings))``) and ``repq.json``'s ``preprocess`` entry."""

    scale: tuple[int, int] = COCO_SCALE
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    to_rgb: bool = True
    size_divisor: int = 32
    pad_to: tuple[int, int] | None = None  # (h, w) of a static graph's input; None: pad to size_divisor

    def as_dict(self) -> dict:
        """Plain JSON-ready values (lists for tuples)."""
        return {"scale": list(self.scale), "mean": list(self.mean), "std": list(self.std), "to_rgb": self.to_rgb,
                "size_divisor": self.size_divisor, "pad_to": list(self.pad_to) if self.pad_to else None}

    @classmethod
    def from_dict(cls, raw: dict, where: str = "preprocess") -> PreprocessSettings:
        """The inverse of ``as_dict`` (a missing ``pad_to`` means none), each field checked; a UserError
        names ``where`` and the field (e.g. ``repq.json: preprocess.std``)."""
        if not isinstance(raw, dict):
            raise UserError(f"{where}: must be an object, got {type(raw).__name__}")
        missing = [key for key in ("scale", "mean", "std", "to_rgb", "size_divisor") if key not in raw]
        if missing:
            raise UserError(f"{where}.{missing[0]}: missing")
        return checked_settings({key: raw.get(key) for key in FIELD_NAMES}, {key: f"{where}.{key}" for key in FIELD_NAMES})


FIELD_NAMES = ("scale", "mean", "std", "to_rgb", "size_divisor", "pad_to")
#: the network's coarsest feature stride: a padded side that is not a multiple of it breaks the FPN
NETWORK_STRIDE = 32
#: the longest side a pipeline may resize to (the reference's is 1333; past this memory, not accuracy, rules)
MAX_SCALE_SIDE = 8192


def _finite_numbers(value: object, count: int) -> bool:
    """A list or tuple of `count` finite numbers (no bools)."""
    return (isinstance(value, (list, tuple)) and len(value) == count
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value))


def _positive_ints(value: object, count: int, limit: int) -> bool:
    """A list or tuple of `count` integers in 1..limit (no bools)."""
    return (isinstance(value, (list, tuple)) and len(value) == count
            and all(isinstance(v, int) and not isinstance(v, bool) and 0 < v <= limit for v in value))


def checked_settings(raw: dict, names: dict[str, str]) -> PreprocessSettings:
    """PreprocessSettings from raw values, each checked on entry so no image fails later; a UserError
    names the field as ``names`` spells it (a config path or a manifest key)."""
    def fail(key: str, problem: str) -> UserError:
        return UserError(f"{names[key]}: {problem}, got {raw.get(key)!r:.60}")

    if not _positive_ints(raw["scale"], 2, MAX_SCALE_SIDE):
        raise fail("scale", f"must be two integers in 1..{MAX_SCALE_SIDE} (long, short)")
    if not _finite_numbers(raw["mean"], 3):
        raise fail("mean", "must be 3 finite numbers (one a colour channel)")
    if not (_finite_numbers(raw["std"], 3) and all(v > 0 for v in raw["std"])):
        raise fail("std", "must be 3 finite numbers > 0 (one a colour channel; the image is divided by them)")
    if not isinstance(raw["to_rgb"], bool):
        raise fail("to_rgb", "must be True or False")
    divisor = raw["size_divisor"]
    if not (isinstance(divisor, int) and not isinstance(divisor, bool) and 0 < divisor <= 1024
            and divisor % NETWORK_STRIDE == 0):
        raise fail("size_divisor", f"must be a positive multiple of {NETWORK_STRIDE} up to 1024 (the network's "
                   "coarsest stride)")
    pad_to = raw.get("pad_to")
    if pad_to is not None and not (_positive_ints(pad_to, 2, MAX_SCALE_SIDE)
                                   and all(v % NETWORK_STRIDE == 0 for v in pad_to)):
        raise fail("pad_to", f"must be null or two multiples of {NETWORK_STRIDE} in 1..{MAX_SCALE_SIDE} (h, w)")
    return PreprocessSettings(scale=(raw["scale"][0], raw["scale"][1]), mean=tuple(float(m) for m in raw["mean"]),
                              std=tuple(float(v) for v in raw["std"]), to_rgb=raw["to_rgb"], size_divisor=divisor,
                              pad_to=None if pad_to is None else (pad_to[0], pad_to[1]))


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

    Written with the same cv2 calls mmcv makes (in-place subtract and multiply of a float32 image by
    float32 mean/std held in double), not with numpy: cv2 picks its arithmetic by CPU (on some it
    rounds in double, on others in float32), and only the same calls give mmcv's values on every CPU.
    """
    x = np.ascontiguousarray(img, dtype=np.float32)
    mean64 = np.float64(np.asarray(mean, dtype=np.float32).reshape(1, -1))
    stdinv64 = 1.0 / np.float64(np.asarray(std, dtype=np.float32).reshape(1, -1))
    if to_rgb:
        cv2.cvtColor(x, cv2.COLOR_BGR2RGB, x)
    cv2.subtract(x, mean64, x)
    cv2.multiply(x, stdinv64, x)
    return x


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
    pad_to: tuple[int, int] | None = None,
) -> Preprocessed:
    """Resize, normalize and zero-pad an (H, W, 3) uint8 BGR image into a [1, 3, Hp, Wp] tensor.

    `pad_to` (h, w) pads to that fixed size instead (a graph exported at a static size).
    """
    if img_bgr.ndim != 3 or img_bgr.shape[2] != 3 or img_bgr.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 image, got {img_bgr.shape} {img_bgr.dtype}")
    if len(scale) != 2 or min(scale) <= 0 or size_divisor <= 0:
        raise ValueError(f"bad scale {scale} or size_divisor {size_divisor}")
    ori_h, ori_w = img_bgr.shape[:2]
    resized, scale_factor = resize_keep_ratio(img_bgr, scale)
    chw = normalize(resized, mean, std, to_rgb).transpose(2, 0, 1)
    h, w = chw.shape[1:]
    pad_h, pad_w = padded_size(h, w, size_divisor) if pad_to is None else pad_to
    if h > pad_h or w > pad_w:
        raise UserError(f"image resized to {h}x{w} (h x w) does not fit the graph's static input size "
                        f"{pad_h}x{pad_w}; export with a dynamic-shape deploy config")
    tensor = torch.zeros((1, 3, pad_h, pad_w), dtype=torch.float32)
    tensor[0, :, :h, :w] = torch.from_numpy(np.ascontiguousarray(chw))
    return Preprocessed(tensor, (h, w), (ori_h, ori_w), scale_factor)
