"""The wire format of the served detector: what a request and a response carry, as Triton tensors.

A request is one encoded image (its file bytes as a UINT8 tensor) and optionally a score threshold;
a response holds the detections in original-image pixels, class names, and masks as COCO RLE
(`counts` strings, all of the image's size). Every tensor has Triton's leading batch dimension of 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..data.images import decode, header_size, truncation
from ..data.postprocess import Detections
from ..resources import MAX_PIXELS  # and one that declares or decodes to more pixels than this
from ..evaluation.visualize import class_name

MODEL_NAME = "repq_detector"
IMAGE, SCORE_THR = "image", "score_thr"
BOXES, SCORES, LABELS = "boxes", "scores", "labels"
CLASS_NAMES, MASKS, IMAGE_SIZE = "class_names", "masks", "image_size"
MAX_IMAGE_BYTES = 32 * 1024 * 1024  # an encoded picture larger than this is refused before decoding


class BadRequest(ValueError):
    """A request the server refuses (not an image, empty, too large, wrong shape); the server keeps serving."""


@dataclass
class ServedDetections:
    """Detections as a client receives them: original-image pixels, RLE masks, class names."""

    boxes: np.ndarray  # float32 [N, 4] x1, y1, x2, y2
    scores: np.ndarray  # float32 [N]
    labels: np.ndarray  # int64 [N], 0-based
    class_names: list[str]
    masks: list[dict]  # COCO RLEs {'size': [H, W], 'counts': str}
    image_size: tuple[int, int]  # (H, W)

    def __len__(self) -> int:
        return len(self.scores)

    def as_detections(self) -> Detections:
        """The same detections as the project's Detections (for drawing and COCO records)."""
        return Detections(self.boxes, self.scores, self.labels, self.masks)


def header_pixels(data: bytes) -> int | None:
    """Width x height read from the image's header without decoding (None where not found)."""
    size = header_size(data)
    return None if size is None else size[0] * size[1]


def decode_image(data: np.ndarray, max_bytes: int = MAX_IMAGE_BYTES, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """The request's image tensor ([1, n] uint8 file bytes) as an (H, W, 3) uint8 BGR array, as read_image does."""
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[0] != 1:
        raise BadRequest(f"'{IMAGE}' must be one image's file bytes, UINT8 of shape [1, n] (got {data.dtype} "
                         f"{list(data.shape)}); send one image per request")
    if data.size == 0:
        raise BadRequest("empty image")
    if data.size > max_bytes:
        raise BadRequest(f"image of {data.size} bytes is over the server's limit of {max_bytes}")
    raw = data.tobytes()
    pixels = header_pixels(raw)
    if pixels is not None and pixels > max_pixels:
        raise BadRequest(f"image of {pixels} pixels is over the server's limit of {max_pixels}")
    cut = truncation(raw)
    if cut is not None:
        raise BadRequest(f"cannot decode image ({cut})")
    img = decode(data)
    if img is None:
        raise BadRequest("cannot decode image (not a format OpenCV reads)")
    if img.shape[0] * img.shape[1] > max_pixels:
        raise BadRequest(f"image of {img.shape[0] * img.shape[1]} pixels is over the server's limit of {max_pixels}")
    return img


def score_threshold(request: dict) -> float:
    """The request's score threshold (0 when absent): detections below it are left out."""
    if SCORE_THR not in request:
        return 0.0
    value = np.asarray(request[SCORE_THR]).reshape(-1)
    if value.size != 1 or not 0.0 <= float(value[0]) <= 1.0:  # also refuses nan
        raise BadRequest(f"'{SCORE_THR}' must be one number in 0..1")
    return float(value[0])


def encode_response(dets: Detections, classes: Sequence[str] | None, score_thr: float,
                    image_hw: tuple[int, int]) -> dict[str, np.ndarray]:
    """Detections scoring at least `score_thr`, in detection order, as the response's tensors."""
    keep = np.flatnonzero(dets.scores >= score_thr)
    labels = dets.labels[keep]
    return {
        BOXES: dets.boxes[keep].astype(np.float32)[None],
        SCORES: dets.scores[keep].astype(np.float32)[None],
        LABELS: labels.astype(np.int64)[None],
        CLASS_NAMES: np.array([[class_name(int(i), classes).encode() for i in labels]], dtype=np.bytes_).reshape(1, -1),
        MASKS: np.array([[dets.masks[i]["counts"].encode() for i in keep]], dtype=np.bytes_).reshape(1, -1),
        IMAGE_SIZE: np.array([list(image_hw)], dtype=np.int64),
    }


def _texts(array: np.ndarray) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else str(v) for v in np.asarray(array).reshape(-1)]


def decode_response(outputs: dict[str, np.ndarray]) -> ServedDetections:
    """The response's tensors back into detections (masks take the served image's size)."""
    counts = _texts(outputs[MASKS])
    image_hw = tuple(int(v) for v in np.asarray(outputs[IMAGE_SIZE]).reshape(-1)[:2])
    return ServedDetections(
        boxes=np.asarray(outputs[BOXES], np.float32).reshape(-1, 4),
        scores=np.asarray(outputs[SCORES], np.float32).reshape(-1),
        labels=np.asarray(outputs[LABELS], np.int64).reshape(-1),
        class_names=_texts(outputs[CLASS_NAMES]),
        masks=[{"size": list(image_hw), "counts": c} for c in counts],
        image_size=tuple(image_hw),
    )
