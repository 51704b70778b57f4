"""COCO-format datasets as the reference's test loader sees them (mmdet 2.11 CocoDataset, test mode).

Order matters for exactness: mmdet iterates ``coco.getImgIds()``, which is the order of
``images`` in the file (the reference calibrates on the first one), and labels index the
categories in file order.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
from collections.abc import Iterator
from pathlib import Path, PurePath

from pycocotools.coco import COCO

from repq_export.errors import UserError
from repq_export.files import read_input_text
from repq_export.resources import MAX_ANNOTATION_BYTES

def load_coco(ann_file: str | Path, option: str | None = None) -> COCO:
    """Read and check a COCO annotation file; return a pycocotools COCO index (quietly)."""
    text = read_input_text(ann_file, "annotation", option, MAX_ANNOTATION_BYTES)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(f"{ann_file}: not a JSON file ({err})") from None
    _check_annotations(data, ann_file)
    coco = COCO()
    coco.dataset = data
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            coco.createIndex()
    except (KeyError, TypeError) as err:
        raise UserError(f"{ann_file}: malformed annotation or image record ({err!r})") from None
    return coco


def _check_annotations(data: object, ann_file: str | Path) -> None:
    """Raise UserError unless ``data`` looks like a COCO instances file with images."""
    if not isinstance(data, dict):
        raise UserError(f"{ann_file}: not a COCO annotation file (top level is not an object)")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise UserError(f"{ann_file}: not a COCO annotation file (no '{key}' list)")
    if not data["images"]:
        raise UserError(f"{ann_file}: the dataset has no images")
    if not data["categories"]:
        raise UserError(f"{ann_file}: the dataset has no categories")
    for img in data["images"]:
        if not (isinstance(img, dict) and isinstance(img.get("id"), (int, str)) and not isinstance(img["id"], bool)
                and isinstance(img.get("file_name"), str)):
            raise UserError(f"{ann_file}: an image record lacks 'id' or 'file_name': {img!r:.80}")
    for cat in data["categories"]:
        if not isinstance(cat, dict) or "id" not in cat or "name" not in cat:
            raise UserError(f"{ann_file}: a category record lacks 'id' or 'name': {cat!r:.80}")
    ids = [img["id"] for img in data["images"]]
    if len(set(ids)) != len(ids):
        raise UserError(f"{ann_file}: image ids are not unique")
    for img in data["images"]:
        _check_file_name(img["file_name"], ann_file)
    cat_ids = {cat["id"] for cat in data["categories"]}
    image_ids = set(ids)
    for ann in data["annotations"]:
        _check_annotation(ann, ann_file)
        if ann["image_id"] not in image_ids or ann["category_id"] not in cat_ids:
            which = "image_id" if ann["image_id"] not in image_ids else "category_id"
            raise UserError(f"{ann_file}: annotation {ann['id']!r:.20}: {which} {ann[which]!r:.20} is not "
                            f"among the file's {'images' if which == 'image_id' else 'categories'}")


def _check_file_name(name: str, ann_file: str | Path) -> None:
    """Refuse a file_name that would read outside the image folder (absolute, or with '..')."""
    parts = PurePath(name.replace("\\", "/")).parts
    if not name or PurePath(name).is_absolute() or name.startswith(("/", "\\")) or ".." in parts:
        raise UserError(f"{ann_file}: image file_name {name!r:.80} points outside the image folder "
                        "(give a path relative to --img-dir, without '..')")


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_annotation(ann: object, ann_file: str | Path) -> None:
    """Refuse an annotation record that pycocotools would choke on later (mid-evaluation)."""
    if not isinstance(ann, dict):
        raise UserError(f"{ann_file}: an annotation is not an object: {ann!r:.80}")
    missing = [key for key in ("id", "image_id", "category_id", "bbox") if key not in ann]
    if missing:
        raise UserError(f"{ann_file}: annotation {ann.get('id', '?')!r:.20} lacks {', '.join(missing)}")
    for key in ("image_id", "category_id"):
        if not isinstance(ann[key], (int, str)) or isinstance(ann[key], bool):
            raise UserError(f"{ann_file}: annotation {ann['id']!r:.20}: {key} must be an id, got {ann[key]!r:.40}")
    bbox = ann["bbox"]
    if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) for v in bbox)):
        raise UserError(f"{ann_file}: annotation {ann['id']!r:.20}: bbox must be a list of 4 numbers "
                        f"[x, y, w, h], got {bbox!r:.60}")
    if "area" in ann and not _is_number(ann["area"]):
        raise UserError(f"{ann_file}: annotation {ann['id']!r:.20}: area must be a number, got {ann['area']!r:.40}")
    segm = ann.get("segmentation")
    polygons = isinstance(segm, list) and all(
        isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0 and all(_is_number(v) for v in p) for p in segm)
    rle = isinstance(segm, dict) and "counts" in segm and isinstance(segm.get("size"), list)
    if segm is not None and not (polygons or rle):
        raise UserError(f"{ann_file}: annotation {ann['id']!r:.20}: segmentation must be polygons (lists of "
                        f"x, y numbers) or an RLE object with counts and size, got {segm!r:.60}")


class CocoDataset:
    """Images of a COCO annotation file in file order, with the label <-> category mapping."""

    def __init__(self, ann_file: str | Path, img_dir: str | Path):
        self.ann_file = Path(ann_file)
        self.img_dir = Path(img_dir)
        self.coco = load_coco(self.ann_file)
        self.img_ids: list[int] = self.coco.getImgIds()
        categories = self.coco.dataset["categories"]
        self.cat_ids: list[int] = [cat["id"] for cat in categories]  # index = label
        self.classes: tuple[str, ...] = tuple(cat["name"] for cat in categories)
        self.cat2label: dict[int, int] = {cat_id: i for i, cat_id in enumerate(self.cat_ids)}

    def __len__(self) -> int:
        return len(self.img_ids)

    def __getitem__(self, index: int) -> tuple[dict, Path]:
        """(image record, image path) of the index-th image in file order."""
        info = self.coco.imgs[self.img_ids[index]]
        return info, self.img_dir / info["file_name"]

    def __iter__(self) -> Iterator[tuple[dict, Path]]:
        return (self[i] for i in range(len(self)))
