"""A deterministic synthetic COCO-format instance-segmentation set: shapes of four classes (each
in its own colour family, faintly textured and shaded) on calm textured, noisy backgrounds, with
occlusion, so that a small detector trained on it gives meaningful box and mask AP without a COCO
copy.

Each image draws from its own generator seeded by (seed, split, index), so image k is the same
whatever the number of images; the same arguments give byte-identical files (same numpy,
OpenCV and zlib builds).
"""
from __future__ import annotations

import json
import math
import re
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pycocotools.mask as mask_util

from repq_export.data.rle import mask_to_rle
from repq_export.errors import UserError
from repq_export.files import write_atomically
from repq_export.output_dir import FolderKind, staged_dir

CATEGORIES = ("ellipse", "rectangle", "triangle", "star")
SIDE_RANGE = (240, 520)  # image height and width, pixels
MAX_OBJECTS = 6
# Smallest object extent, pixels: the detectors' smallest anchor is 32 px (stride 4, scale 8), and
# a box under about 18 px cannot reach the RPN's 0.3 IoU with it, so smaller objects would only be
# misses that no training fixes.
MIN_EXTENT = 24.0
MAX_EXTENT_FRACTION = 0.6  # largest object extent, fraction of the short image side
MIN_VISIBLE_FRACTION = 0.5  # objects occluded beyond this are not drawn at all
MIN_VISIBLE_PIXELS = 30
NOISE_SIGMA = 4.0
# Each class has its own colour (BGR: red ellipses, green rectangles, blue triangles, yellow
# stars), varied by up to CLASS_COLOUR_SPREAD per channel, on a background whose base colour is at
# least BACKGROUND_CONTRAST from all of them. Shape alone is the harder cue: a small Swin trained
# from scratch for half an hour on the CPU learned boxes and masks but hardly which shape is which
# (loss_cls stayed near 0.6 over 800 iterations; box AP 0.11, mask AP 0.13), and these detectors
# are there to measure quantization on a working detector, not to be a hard benchmark.
CLASS_COLOURS = ((40, 40, 200), (40, 190, 40), (200, 80, 30), (30, 200, 210))
CLASS_COLOUR_SPREAD = 35.0
BACKGROUND_CONTRAST = 110.0
TEXTURE_CONTRAST = 40.0  # largest per-channel step between an object's two texture colours
PNG_PARAMS = [cv2.IMWRITE_PNG_COMPRESSION, 3]
_SPLIT_NAME = re.compile(r"^[A-Za-z0-9_-]+$")
MAX_IMAGES = 100_000  # about 30 GB of PNGs; more is a typo
SYNTHETIC_SET = FolderKind("a synthetic set", None, None, lambda manifest: {},
                           re.compile(r"annotations/instances_[A-Za-z0-9_-]+\.json|[A-Za-z0-9_-]+/\d{12}\.png"),
                           re.compile(r"[A-Za-z0-9_-]+"))


@dataclass(frozen=True)
class Shape:
    """Geometry of one object: class, centre (x, y), half extent, minor/major ratio, rotation."""

    label: int
    center: tuple[float, float]
    radius: float
    aspect: float
    angle: float  # radians


@dataclass(frozen=True)
class Instance:
    """One annotated object: its class and the pixels left visible after occlusion."""

    label: int
    mask: np.ndarray  # bool (H, W)
    full_area: int  # pixels inside the image before occlusion


def sample_shape(rng: np.random.Generator, h: int, w: int) -> Shape:
    """A random object: extent log-uniform in [24 px, 60% of the short side], centre inside."""
    label = int(rng.integers(len(CATEGORIES)))
    log_extent = rng.uniform(math.log(MIN_EXTENT), math.log(MAX_EXTENT_FRACTION * min(h, w)))
    elongated = CATEGORIES[label] in ("ellipse", "rectangle")
    aspect = rng.uniform(0.45, 1.0) if elongated else rng.uniform(0.8, 1.0)
    center = (float(rng.uniform(0.05, 0.95) * w), float(rng.uniform(0.05, 0.95) * h))
    angle = float(rng.uniform(0, 2 * math.pi))
    return Shape(label, center, math.exp(log_extent) / 2, float(aspect), angle)


def _unit_outline(category: str) -> list[tuple[float, float]]:
    """Polygon of the class in a unit box around the origin."""
    if category == "rectangle":
        return [(-1.0, -1.0), (1.0, -1.0), (1.0, 1.0), (-1.0, 1.0)]
    if category == "ellipse":
        radii, angles = [1.0] * 64, [2 * math.pi * k / 64 for k in range(64)]
    elif category == "triangle":
        radii, angles = [1.0] * 3, [-math.pi / 2 + 2 * math.pi * k / 3 for k in range(3)]
    else:  # five-pointed star
        radii, angles = [1.0, 0.45] * 5, [-math.pi / 2 + math.pi * k / 5 for k in range(10)]
    return [(r * math.cos(t), r * math.sin(t)) for r, t in zip(radii, angles)]


def shape_mask(shape: Shape, h: int, w: int) -> np.ndarray:
    """The shape's pixels in an (h, w) image, as a bool mask (no anti-aliasing, so exact)."""
    cos_a, sin_a = math.cos(shape.angle), math.sin(shape.angle)
    cx, cy = shape.center
    points = []
    for ux, uy in _unit_outline(CATEGORIES[shape.label]):
        x, y = ux * shape.radius, uy * shape.radius * shape.aspect
        points.append((cx + x * cos_a - y * sin_a, cy + x * sin_a + y * cos_a))
    fixed = np.round(np.array(points) * 16).astype(np.int32)  # 4 fractional bits
    canvas = np.zeros((h, w), dtype=np.uint8)
    cv2.fillPoly(canvas, [fixed], 1, lineType=cv2.LINE_8, shift=4)
    return canvas.astype(bool)


def visible_masks(full_masks: list[np.ndarray]) -> list[np.ndarray]:
    """Each mask minus the pixels of the masks after it (objects drawn later are on top)."""
    if not full_masks:
        return []
    owner = np.full(full_masks[0].shape, -1, dtype=np.int16)
    for i, mask in enumerate(full_masks):
        owner[mask] = i
    return [owner == i for i in range(len(full_masks))]


def keep_visible(full_masks: list[np.ndarray]) -> list[int]:
    """Indices of objects visible enough to annotate. Removing the others only uncovers pixels
    of the kept ones, so the kept set stays valid once the others are left out."""
    keep = []
    for i, (full, vis) in enumerate(zip(full_masks, visible_masks(full_masks))):
        if vis.sum() >= max(MIN_VISIBLE_PIXELS, MIN_VISIBLE_FRACTION * full.sum()):
            keep.append(i)
    return keep


def _pattern(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A texture in [0, 1] of shape (h, w): flat, stripes, checker or blotchy noise."""
    kind = int(rng.integers(4))
    if kind == 0:
        return np.zeros((h, w), dtype=np.float32)
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    period = float(rng.uniform(4, 24))
    theta = float(rng.uniform(0, math.pi))
    if kind == 1:
        phase = (xs * math.cos(theta) + ys * math.sin(theta)) * (2 * math.pi / period)
        return (0.5 + 0.5 * np.sin(phase)).astype(np.float32)
    if kind == 2:
        return (((xs // period) + (ys // period)) % 2).astype(np.float32)
    coarse = rng.random((h // 6 + 2, w // 6 + 2)).astype(np.float32)
    return cv2.resize(coarse, (w, h), interpolation=cv2.INTER_LINEAR)


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Float (h, w, 3) background: a base colour far from every class colour, low-frequency
    blotches and a faint texture."""
    base = _far_colour(rng, np.array(CLASS_COLOURS, dtype=np.float32))
    coarse = rng.normal(0, 1, (h // 40 + 2, w // 40 + 2, 3)).astype(np.float32)
    blotches = cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC)
    blotches *= float(rng.uniform(5, 15))
    texture = (_pattern(rng, h, w) - 0.5)[:, :, None] * rng.uniform(-12, 12, 3).astype(np.float32)
    return base + blotches + texture


def _far_colour(rng: np.random.Generator, avoid: np.ndarray) -> np.ndarray:
    """A colour at least ``BACKGROUND_CONTRAST`` (Euclidean over BGR) from each row of ``avoid``
    (the last draw if none is, after a fixed number of draws, to stay deterministic)."""
    for _ in range(50):
        colour = rng.uniform(20, 235, 3).astype(np.float32)
        if float(np.linalg.norm(avoid - colour, axis=1).min()) >= BACKGROUND_CONTRAST:
            break
    return colour


def _paint(img: np.ndarray, mask: np.ndarray, label: int, rng: np.random.Generator) -> None:
    """Fill ``mask`` in ``img`` with a shaded surface near its class's colour, textured with a
    second colour close to it."""
    rows, cols = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
    r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    spread = rng.uniform(-CLASS_COLOUR_SPREAD, CLASS_COLOUR_SPREAD, 3).astype(np.float32)
    first = np.array(CLASS_COLOURS[label], dtype=np.float32) + spread
    second = first + rng.uniform(-TEXTURE_CONTRAST, TEXTURE_CONTRAST, 3).astype(np.float32)
    mix = _pattern(rng, r1 - r0, c1 - c0)[:, :, None]
    shade = np.linspace(-1, 1, c1 - c0, dtype=np.float32)[None, :, None]
    shade *= float(rng.uniform(-25, 25))
    surface = first * (1 - mix) + second * mix + shade
    region = img[r0:r1, c0:c1]
    local = mask[r0:r1, c0:c1]
    region[local] = surface[local]


def synthesize_image(seed: int, split: str, index: int) -> tuple[np.ndarray, list[Instance]]:
    """The index-th image of a split (uint8 BGR) and its visible instances, drawing order."""
    rng = np.random.default_rng([seed, zlib.crc32(split.encode()), index])
    h, w = (int(v) for v in rng.integers(SIDE_RANGE[0], SIDE_RANGE[1] + 1, 2))
    shapes = [sample_shape(rng, h, w) for _ in range(int(rng.integers(1, MAX_OBJECTS + 1)))]
    full = [shape_mask(s, h, w) for s in shapes]
    kept = keep_visible(full)
    shapes, full = [shapes[i] for i in kept], [full[i] for i in kept]
    img = _background(rng, h, w)
    for shape, mask in zip(shapes, full):
        _paint(img, mask, shape.label, rng)
    img += rng.normal(0, NOISE_SIGMA, img.shape).astype(np.float32)
    img = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    visible = visible_masks(full)
    return img, [Instance(s.label, v, int(f.sum())) for s, f, v in zip(shapes, full, visible)]


def _annotation(instance: Instance, ann_id: int, image_id: int) -> dict:
    """COCO annotation record of one instance: RLE, bbox and area from the visible mask."""
    rle = mask_to_rle(instance.mask)
    coco_rle = {"size": rle["size"], "counts": rle["counts"].encode("ascii")}
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": instance.label + 1,
        "segmentation": rle,
        "area": float(mask_util.area(coco_rle)),
        "bbox": [float(v) for v in mask_util.toBbox(coco_rle)],
        "iscrowd": 0,
    }


def _check_arguments(out_dir: Path, split: str, num_images: int, seed: int) -> None:
    if not _SPLIT_NAME.match(split):
        raise UserError(f"--split: '{split}' is not a plain name (letters, digits, _ and -)")
    if not 1 <= num_images <= MAX_IMAGES:
        raise UserError(f"--num-images: must be 1..{MAX_IMAGES}, got {num_images}")
    if seed < 0:
        raise UserError(f"--seed: must be non-negative, got {seed}")
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir}: exists and is not a directory")
    ann = out_dir / "annotations" / f"instances_{split}.json"
    if (ann.exists() or ann.is_symlink()) and not _is_synthetic_annotation(ann):
        raise UserError(f"{ann}: exists and is not a synthetic set's annotation file; it is left alone: give "
                        "another --out")


SET_DESCRIPTION = "repq-export synthetic shapes"  # the annotation file's info.description: how a set is recognised
MAX_ANNOTATION_BYTES = 1 << 30


def _is_synthetic_annotation(path: Path) -> bool:
    """Whether `path` is an annotation file this module wrote (a regular file whose info names the set)."""
    try:
        if path.is_symlink() or not path.is_file() or path.stat().st_size > MAX_ANNOTATION_BYTES:
            return False
        info = json.loads(path.read_bytes()).get("info")
    except (OSError, ValueError, AttributeError):
        return False
    return isinstance(info, dict) and info.get("description") == SET_DESCRIPTION


def _write_new_or_same(path: Path, data: bytes) -> None:
    """Write an image of the set, refusing to replace a file with other bytes (one that is not this set's)."""
    if path.exists() or path.is_symlink():
        if path.is_symlink() or not path.is_file() or path.read_bytes() != data:
            raise UserError(f"{path}: exists and is not this synthetic set's image; it is left alone: give "
                            "another --out")
        return
    write_atomically(path, data)


def make_synthetic_coco(
    out_dir: str | Path, split: str = "val", num_images: int = 100, seed: int = 0
) -> Path:
    """Write ``out_dir/annotations/instances_{split}.json`` and ``out_dir/{split}/{id:012d}.png``;
    return the annotation file's path."""
    out_dir = Path(out_dir)
    _check_arguments(out_dir, split, num_images, seed)
    img_dir, ann_dir = out_dir / split, out_dir / "annotations"
    _make_folder(img_dir)
    images, annotations = [], []
    for index in range(num_images):
        image_id = index + 1
        img, instances = synthesize_image(seed, split, index)
        file_name = image_file_name(image_id)
        _, png = cv2.imencode(".png", img, PNG_PARAMS)
        _write_new_or_same(img_dir / file_name, png.tobytes())
        height, width = img.shape[:2]
        images.append({"id": image_id, "file_name": file_name, "height": height, "width": width})
        for instance in instances:
            annotations.append(_annotation(instance, len(annotations) + 1, image_id))
    categories = [
        {"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(CATEGORIES)
    ]
    dataset = {
        "info": {"description": SET_DESCRIPTION, "split": split, "seed": seed},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": categories,
    }
    text = json.dumps(dataset, sort_keys=True, separators=(",", ":"))
    _make_folder(ann_dir)  # made only now: a refused image leaves no empty annotations folder behind
    ann_path = ann_dir / f"instances_{split}.json"
    write_atomically(ann_path, text.encode("utf-8"))
    return ann_path


def _make_folder(folder: Path) -> None:
    """Create a folder of the set (and its parents) if missing; one line where that fails."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"{folder}: cannot create the folder ({err.strerror or err})") from None


def image_file_name(image_id: int) -> str:
    """The file name of an image of a synthetic set."""
    return f"{image_id:012d}.png"


def synthetic_set_complete(root: Path, split: str, num_images: int) -> bool:
    """Whether `root` holds the whole set: its annotation file and every one of its images."""
    return (root / "annotations" / f"instances_{split}.json").is_file() and all(
        (root / split / image_file_name(i)).is_file() for i in range(1, num_images + 1))


def make_synthetic_set(root: Path, split: str, num_images: int, seed: int,
                       log: Callable[[], object] = lambda: None) -> Path:
    """The annotation file of the synthetic set in `root`, made if missing: written into a hidden sibling
    and renamed into place whole, so Ctrl-C or a full disk never leaves a partial set under `root`; an
    incomplete `root` (of an older version) is completed in place (the same arguments give the same bytes)."""
    _check_arguments(root, split, num_images, seed)
    ann = root / "annotations" / f"instances_{split}.json"
    if synthetic_set_complete(root, split, num_images):
        return ann
    log()
    if root.is_dir():
        make_synthetic_coco(root, split, num_images, seed)
        return ann
    with staged_dir(root, force=False, option="synthetic set", kind=SYNTHETIC_SET) as tmp:
        make_synthetic_coco(tmp, split, num_images, seed)
    return ann
