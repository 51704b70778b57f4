"""Pictures for people who would rather look than read, drawn with OpenCV only (no plotting library).

    draw_detections    boxes, class labels with scores, translucent masks on one image
    side_by_side       fake-quant and backend detections of one image, next to each other
    plot_layer_errors  a bar chart of each quantizer's relative error, layers with code mismatches marked
    write_image        an image file written atomically (a reader never sees half a PNG)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import pycocotools.mask as mask_util

from ..data.postprocess import Detections
from ..errors import UserError
from ..files import write_atomically
from ..quant.kinds import ACTIVATION, SOFTMAX, WEIGHT
from .layer_errors import LayerError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")

# distinct BGR colours, one a class (cycled); the first ones differ most (small label sets)
PALETTE = (
    (60, 60, 230), (80, 190, 60), (220, 120, 30), (40, 200, 240), (200, 60, 200), (200, 200, 40),
    (30, 130, 250), (160, 70, 120), (80, 230, 160), (170, 140, 250), (40, 90, 150), (140, 140, 20),
)
FONT = cv2.FONT_HERSHEY_SIMPLEX
WHITE, BLACK, GRAY, LIGHT_GRAY, RED = (255, 255, 255), (0, 0, 0), (110, 110, 110), (225, 225, 225), (0, 0, 220)
ROLE_COLORS = {ACTIVATION: (200, 120, 40), WEIGHT: (40, 140, 240), SOFTMAX: (60, 170, 60)}


def class_color(label: int) -> tuple[int, int, int]:
    """The BGR colour of class `label` (the same in every picture)."""
    return PALETTE[int(label) % len(PALETTE)]


def class_name(label: int, classes: Sequence[str] | None) -> str:
    """The class name of a 0-based label, or 'class N' where the model carries no names."""
    return classes[label] if classes is not None and 0 <= label < len(classes) else f"class {label}"


def _binary_mask(dets: Detections, index: int) -> np.ndarray:
    """Detection `index`'s mask as an (H, W) bool array: the kept binary mask, else its RLE decoded."""
    if dets.binary_masks is not None:
        return dets.binary_masks[index]
    return mask_util.decode(dets.masks[index]).astype(bool)


def _text_style(shape: tuple[int, ...]) -> tuple[float, int]:
    """Font scale and line thickness that stay legible from 200 px to 2000 px images."""
    side = min(shape[:2])
    return max(0.35, min(1.2, side / 700)), max(1, round(side / 400))


def _put_label(img: np.ndarray, text: str, x: int, y: int, color: tuple[int, int, int]) -> None:
    """`text` on a filled `color` tab whose lower-left corner is (x, y), moved inside the image."""
    scale, thickness = _text_style(img.shape)
    (tw, th), base = cv2.getTextSize(text, FONT, scale, max(1, thickness - 1))
    h, w = img.shape[:2]
    x = int(min(max(x, 0), max(w - tw - 4, 0)))
    y = int(min(max(y, th + base + 2), h))  # too close to the top: the tab goes inside the box
    cv2.rectangle(img, (x, y - th - base - 2), (x + tw + 4, y), color, -1)
    ink = BLACK if sum(c * k for c, k in zip(color, (0.114, 0.587, 0.299))) > 150 else WHITE
    cv2.putText(img, text, (x + 2, y - base - 1), FONT, scale, ink, max(1, thickness - 1), cv2.LINE_AA)


def draw_detections(img_bgr: np.ndarray, dets: Detections, classes: Sequence[str] | None = None,
                    score_thr: float = 0.3, alpha: float = 0.45) -> np.ndarray:
    """A copy of `img_bgr` with every detection scoring at least `score_thr`: translucent mask with its
    outline, box, and 'class score' label, in the class's colour (the best detection drawn last, on top)."""
    out = img_bgr.copy()
    _, thickness = _text_style(out.shape)
    order = [int(i) for i in np.argsort(dets.scores, kind="stable") if dets.scores[i] >= score_thr]
    for i in order:
        mask = _binary_mask(dets, i)
        if mask.shape != out.shape[:2]:
            raise ValueError(f"mask {i} is {mask.shape}, the image {out.shape[:2]}")
        color = np.array(class_color(dets.labels[i]), dtype=np.float32)
        out[mask] = (out[mask] * (1 - alpha) + color * alpha).round().astype(np.uint8)
        contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(out, contours, -1, class_color(dets.labels[i]), 1, cv2.LINE_AA)
    for i in order:
        color = class_color(dets.labels[i])
        x1, y1, x2, y2 = (int(round(float(v))) for v in dets.boxes[i])
        cv2.rectangle(out, (x1, y1), (x2, y2), color, thickness, cv2.LINE_AA)
        _put_label(out, f"{class_name(int(dets.labels[i]), classes)} {dets.scores[i]:.2f}", x1, y1, color)
    return out


def _title_bar(width: int, text: str) -> np.ndarray:
    """A white strip of `width` pixels with `text` on it, left-aligned."""
    scale = max(0.45, min(0.9, width / 800))
    (_, th), base = cv2.getTextSize("Ag", FONT, scale, 1)  # the same height whatever the text
    bar = np.full((th + base + 12, width, 3), 255, dtype=np.uint8)
    cv2.putText(bar, text, (6, th + 6), FONT, scale, BLACK, 1, cv2.LINE_AA)
    return bar


def side_by_side(img_bgr: np.ndarray, dets_ref: Detections, dets_backend: Detections,
                 classes: Sequence[str] | None = None, titles: tuple[str, str] = ("fake quant", "backend"),
                 score_thr: float = 0.3, gap: int = 8) -> np.ndarray:
    """The same image twice, reference detections left and backend detections right, each under a title
    that says how many detections it shows; shape (title + H, 2 W + gap, 3)."""
    panels = []
    for dets, title in zip((dets_ref, dets_backend), titles):
        shown = int((dets.scores >= score_thr).sum())
        drawn = draw_detections(img_bgr, dets, classes, score_thr)
        panels.append(np.vstack([_title_bar(drawn.shape[1], f"{title}: {shown} detections >= {score_thr:g}"),
                                 drawn]))
    spacer = np.full((panels[0].shape[0], gap, 3), 255, dtype=np.uint8)
    return np.hstack([panels[0], spacer, panels[1]])


def write_image(path: str | Path, img: np.ndarray) -> Path:
    """Encode `img` by the file's suffix (.png, .jpg) and write it through a temporary name."""
    path = Path(path)
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise UserError(f"{path}: give an image file name ending in {', '.join(IMAGE_SUFFIXES)}")
    ok, data = cv2.imencode(path.suffix.lower(), img)
    if not ok:
        raise UserError(f"{path}: OpenCV cannot encode the picture")
    return write_atomically(path, data.tobytes())


# ----------------------------------------------------------------------------- per-layer error plot


def _nice_ceiling(value: float) -> tuple[float, float]:
    """An axis top >= value and a tick step, both 1, 2 or 5 times a power of ten (4 to 10 ticks)."""
    if value <= 0:
        return 1.0, 0.2
    step = 10 ** math.floor(math.log10(value / 5))
    for factor in (1, 2, 5, 10):
        if value / (step * factor) <= 10:
            step *= factor
            break
    return step * math.ceil(value / step), step


def detector_part(name: str) -> str:
    """A short name of the part of the detector a quantizer belongs to (the plot's x-axis groups)."""
    parts = name.split(".")
    if parts[0] == "backbone":
        if parts[1] == "layers":
            return f"stage {int(parts[2]) + 1}"
        return "patch embed" if parts[1] == "patch_embed" else parts[1]
    if parts[0] == "neck":
        return "FPN"
    if parts[0] == "rpn_head":
        return "RPN"
    if parts[0] == "roi_head" and len(parts) > 1:
        head = "box head" if parts[1] == "bbox_head" else "mask head" if parts[1] == "mask_head" else parts[1]
        return f"{head} {int(parts[2]) + 1}" if len(parts) > 2 and parts[2].isdigit() else head
    return parts[0]


def _text(img: np.ndarray, text: str, org: tuple[int, int], scale: float = 0.45, color=BLACK) -> None:
    cv2.putText(img, text, (int(org[0]), int(org[1])), FONT, scale, color, 1, cv2.LINE_AA)


def render_layer_errors(errors: Sequence[LayerError], title: str = "", height: int = 520) -> np.ndarray:
    """The per-layer plot as a BGR image: one bar per quantizer in forward order, its relative error
    ||q(x) - x|| / ||x|| in percent, coloured by role; red marks where tier 1 found differing codes."""
    if not errors:
        raise ValueError("render_layer_errors: no quantizers to plot")
    n = len(errors)
    bar = max(2, min(14, 1600 // n))
    left, right, top, bottom = 78, 24, 78, 96
    width = max(900, left + n * bar + right)
    img = np.full((height, width, 3), 255, dtype=np.uint8)
    plot_h = height - top - bottom
    values = [100.0 * e.rel_error for e in errors]
    ymax, step = _nice_ceiling(max(values))
    y_of = lambda v: top + plot_h - int(round(plot_h * min(v, ymax) / ymax))  # noqa: E731

    for k in range(int(round(ymax / step)) + 1):  # grid and y ticks
        v = k * step
        cv2.line(img, (left, y_of(v)), (left + n * bar, y_of(v)), LIGHT_GRAY, 1)
        label = f"{v:g}"
        (tw, _), _ = cv2.getTextSize(label, FONT, 0.4, 1)
        _text(img, label, (left - tw - 6, y_of(v) + 4), 0.4)
    for i, (e, v) in enumerate(zip(errors, values)):
        x = left + i * bar
        cv2.rectangle(img, (x, y_of(v)), (x + max(bar - 2, 1), top + plot_h), ROLE_COLORS[e.role], -1)
        if e.code_mismatches:
            tip = (x + bar // 2, y_of(v) - 4)
            cv2.fillPoly(img, [np.array([tip, (tip[0] - 4, tip[1] - 8), (tip[0] + 4, tip[1] - 8)])], RED)
    cv2.line(img, (left, top), (left, top + plot_h), BLACK, 1)
    cv2.line(img, (left, top + plot_h), (left + n * bar, top + plot_h), BLACK, 1)

    start, row = 0, 0  # x-axis groups: a tick at each boundary, the part's name under its span
    for i in range(1, n + 1):
        if i < n and detector_part(errors[i].name) == detector_part(errors[start].name):
            continue
        x0, x1 = left + start * bar, left + i * bar
        cv2.line(img, (x0, top + plot_h), (x0, top + plot_h + 8), BLACK, 1)
        name = detector_part(errors[start].name)
        (tw, _), _ = cv2.getTextSize(name, FONT, 0.38, 1)
        row = 0 if tw < x1 - x0 else 1 - row  # narrow groups alternate between two rows
        _text(img, name, ((x0 + x1 - tw) // 2, top + plot_h + 22 + 15 * row), 0.38)
        start = i
    _text(img, "quantizers in forward order, grouped by part of the detector", (left, height - 30), 0.5)

    ylabel = np.full((24, plot_h, 3), 255, dtype=np.uint8)  # vertical axis title: drawn flat, rotated
    _text(ylabel, "relative error ||q(x) - x|| / ||x||  (%)", (4, 17), 0.45)
    img[top:top + plot_h, 6:30] = cv2.rotate(ylabel, cv2.ROTATE_90_COUNTERCLOCKWISE)

    _text(img, title or "per-layer quantization error", (left, 24), 0.6)
    worst = sorted(range(n), key=lambda i: -values[i])[:3]
    _text(img, "largest: " + ", ".join(f"{errors[i].name} {values[i]:.1f}%" for i in worst), (left, 46), 0.4, GRAY)
    x = left
    legend = [(role, color) for role, color in ROLE_COLORS.items() if any(e.role == role for e in errors)]
    if any(e.code_mismatches for e in errors):
        legend.append(("codes differ (tier 1)", RED))
    for role, color in legend:
        cv2.rectangle(img, (x, 58), (x + 12, 70), color, -1)
        _text(img, role, (x + 16, 69), 0.4)
        x += 30 + cv2.getTextSize(role, FONT, 0.4, 1)[0][0]
    return img


def plot_layer_errors(errors: Sequence[LayerError], path: str | Path, title: str = "") -> Path:
    """Write the per-layer quantization error plot (render_layer_errors) to the PNG file `path`."""
    return write_image(path, render_layer_errors(errors, title))
