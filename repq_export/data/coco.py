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
from collections.abc import Iterator, Sequence
from pathlib import Path, PurePath

from pycocotools.coco import COCO

from repq_export.errors import UserError
from repq_export.files import read_input_text
from repq_export.resources import MAX_ANNOTATION_BYTES

METRICS_ALL = ("bbox", "segm")


def load_coco(ann_file: str | Path, metrics: Sequence[str] = METRICS_ALL, option: str | None = None) -> COCO:
    """Read and check a COCO annotation file; return a pycocotools COCO index (quietly).

    ``metrics`` are what the file will be scored with: each needs fields of every record that
    pycocotools would otherwise miss only after the whole inference run (``()``: images only, as
    calibration reads it)."""
    text = read_input_text(ann_file, "annotation", option, MAX_ANNOTATION_BYTES)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(f"{ann_file}: not a JSON file ({err})") from None
    except RecursionError:
        raise UserError(f"{ann_file}: not a COCO annotation file (nested too deeply)") from None
    _AnnotationChecker(ann_file, tuple(metrics)).check(data)
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _is_id(value: object) -> bool:
    """COCO ids are integers (pycocotools and the result records need them as such)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    """A finite int or float that is not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_count(value: object) -> bool:
    """An integer >= 0 that is not a bool."""
    return _is_id(value) and value >= 0


def _short(value: object) -> str:
    """A value as a message shows it: its repr, cut to one short piece."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class _AnnotationChecker:
    """Every field of a COCO instances file that this tool or pycocotools reads, checked once on entry.

    Each problem is one UserError naming the file and the field, e.g.
    ``ann.json: annotations[12].iscrowd: must be 0 or 1, got 2``."""

    def __init__(self, ann_file: str | Path, metrics: tuple[str, ...]):
        self.ann_file = ann_file
        self.scored = bool(metrics)  # scoring needs area and iscrowd on every annotation
        self.masks = "segm" in metrics  # mask AP needs a segmentation and the image size everywhere
        self.image_sizes: dict[int, tuple[int, int] | None] = {}

    def fail(self, where: str, problem: str) -> UserError:
        """One line naming the file and the field."""
        return UserError(f"{self.ann_file}: {where}: {problem}")

    def check(self, data: object) -> None:
        """Raise UserError unless ``data`` is a COCO instances file with images that can be scored."""
        if not isinstance(data, dict):
            raise UserError(f"{self.ann_file}: not a COCO annotation file (top level is not an object)")
        for key in ("images", "annotations", "categories"):
            if not isinstance(data.get(key), list):
                raise UserError(f"{self.ann_file}: not a COCO annotation file (no '{key}' list)")
        if not data["images"]:
            raise UserError(f"{self.ann_file}: the dataset has no images")
        if not data["categories"]:
            raise UserError(f"{self.ann_file}: the dataset has no categories")
        for i, img in enumerate(data["images"]):
            self.image(f"images[{i}]", img)
        cat_ids: set[int] = set()
        for i, cat in enumerate(data["categories"]):
            cat_ids.add(self.category(f"categories[{i}]", cat, cat_ids))
        ann_ids: set[int] = set()
        for i, ann in enumerate(data["annotations"]):
            ann_ids.add(self.annotation(f"annotations[{i}]", ann, cat_ids, ann_ids))

    def record(self, where: str, value: object, required: tuple[str, ...]) -> dict:
        """`value` if it is an object holding every `required` key."""
        if not isinstance(value, dict):
            raise self.fail(where, f"must be an object, got {_short(value)}")
        missing = [key for key in required if key not in value]
        if missing:
            raise self.fail(f"{where}.{missing[0]}", f"missing (record lacks {', '.join(missing)})")
        return value

    def new_id(self, where: str, value: object, seen: set[int] | dict) -> int:
        """`value` if it is an integer id not among `seen`."""
        if not _is_id(value):
            raise self.fail(where, f"must be an integer id, got {_short(value)}")
        if value in seen:
            raise self.fail(where, f"{value} is not unique")
        return value

    def image(self, where: str, img: object) -> None:
        """images[i]: unique integer id, a relative file name, and (for mask AP) its size."""
        img = self.record(where, img, ("id", "file_name") + (("height", "width") if self.masks else ()))
        image_id = self.new_id(f"{where}.id", img["id"], self.image_sizes)
        name = img["file_name"]
        if not isinstance(name, str):
            raise self.fail(f"{where}.file_name", f"must be a string, got {_short(name)}")
        _check_file_name(name, self.ann_file, f"{where}.file_name")
        size = None
        if "height" in img or "width" in img:
            for key in ("height", "width"):
                if not (_is_id(img.get(key)) and img[key] > 0):
                    raise self.fail(f"{where}.{key}", f"must be a positive integer, got {_short(img.get(key))}")
            size = (img["height"], img["width"])
        self.image_sizes[image_id] = size

    def category(self, where: str, cat: object, seen: set[int]) -> int:
        """categories[i]: unique integer id and a name."""
        cat = self.record(where, cat, ("id", "name"))
        if not isinstance(cat["name"], str):
            raise self.fail(f"{where}.name", f"must be a string, got {_short(cat['name'])}")
        return self.new_id(f"{where}.id", cat["id"], seen)

    def annotation(self, where: str, ann: object, cat_ids: set[int], seen: set[int]) -> int:
        """annotations[i]: ids that exist, a box, and what scoring reads (area, iscrowd, segmentation)."""
        required = ("id", "image_id", "category_id", "bbox") + (("area", "iscrowd") if self.scored else ()) \
            + (("segmentation",) if self.masks else ())
        ann = self.record(where, ann, required)
        ann_id = self.new_id(f"{where}.id", ann["id"], seen)
        for key, known, among in (("image_id", self.image_sizes, "images"), ("category_id", cat_ids, "categories")):
            if not _is_id(ann[key]):
                raise self.fail(f"{where}.{key}", f"must be an integer id, got {_short(ann[key])}")
            if ann[key] not in known:
                raise self.fail(f"{where}.{key}", f"{ann[key]} is not among the file's {among}")
        bbox = ann["bbox"]
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) for v in bbox)):
            raise self.fail(f"{where}.bbox", f"must be a list of 4 numbers [x, y, w, h], got {_short(bbox)}")
        if "area" in ann and not (_is_number(ann["area"]) and ann["area"] >= 0):
            raise self.fail(f"{where}.area", f"must be a number >= 0, got {_short(ann['area'])}")
        if "iscrowd" in ann and not (_is_id(ann["iscrowd"]) and ann["iscrowd"] in (0, 1)):
            raise self.fail(f"{where}.iscrowd", f"must be 0 or 1, got {_short(ann['iscrowd'])}")
        if "segmentation" in ann:
            self.segmentation(f"{where}.segmentation", ann["segmentation"], self.image_sizes[ann["image_id"]])
        return ann_id

    def segmentation(self, where: str, segm: object, image_size: tuple[int, int] | None) -> None:
        """Polygons (lists of x, y numbers) or an RLE object whose size is the image's."""
        if isinstance(segm, list):
            if not segm:
                raise self.fail(where, "an empty list (give at least one polygon, or leave the key out)")
            for j, poly in enumerate(segm):
                if not (isinstance(poly, list) and len(poly) >= 6 and len(poly) % 2 == 0
                        and all(_is_number(v) for v in poly)):
                    raise self.fail(f"{where}[{j}]", "must be a polygon: a list of at least 3 x, y number pairs, "
                                    f"got {_short(poly)}")
            return
        if not (isinstance(segm, dict) and "counts" in segm and "size" in segm):
            raise self.fail(where, "must be polygons (lists of x, y numbers) or an RLE object with counts and "
                            f"size, got {_short(segm)}")
        size = segm["size"]
        if not (isinstance(size, list) and len(size) == 2 and all(_is_count(v) for v in size)):
            raise self.fail(f"{where}.size", f"must be [height, width] integers, got {_short(size)}")
        if image_size is not None and tuple(size) != image_size:
            raise self.fail(f"{where}.size", f"{size} is not the image's [height, width] {list(image_size)}")
        counts = segm["counts"]
        if isinstance(counts, str):
            decoded = _compressed_rle_counts(counts)
            if decoded is None or any(v < 0 for v in decoded) or sum(decoded) != size[0] * size[1]:
                raise self.fail(f"{where}.counts", "not a compressed RLE of height x width = "
                                f"{size[0] * size[1]} pixels (pycocotools would read past it or leave it short)")
        elif isinstance(counts, list):
            if not all(_is_count(v) for v in counts) or sum(counts) != size[0] * size[1]:
                raise self.fail(f"{where}.counts", "uncompressed RLE counts must be integers >= 0 adding up to "
                                f"height x width = {size[0] * size[1]}")
        else:
            raise self.fail(f"{where}.counts", f"must be a string (compressed RLE) or a list of integers "
                            f"(uncompressed RLE), got {_short(counts)}")


def _compressed_rle_counts(text: str) -> list[int] | None:
    """The run lengths of a COCO compressed RLE string (pycocotools' rleFrString), or None if it is not one."""
    counts: list[int] = []
    pos = 0
    while pos < len(text):
        value, shift, more = 0, 0, True
        while more:
            if pos >= len(text) or not 48 <= ord(text[pos]) < 48 + 64:
                return None
            chunk = ord(text[pos]) - 48
            value |= (chunk & 0x1F) << shift
            more = bool(chunk & 0x20)
            pos, shift = pos + 1, shift + 5
            if not more and chunk & 0x10:
                value |= -1 << shift
        if len(counts) > 2:
            value += counts[-2]
        counts.append(value)
    return counts


def _check_file_name(name: str, ann_file: str | Path, where: str = "file_name") -> None:
    """Refuse a file_name that cannot name a file in the image folder (absolute, '..', NUL)."""
    if "\0" in name:
        raise UserError(f"{ann_file}: {where}: {name!r:.80} holds a NUL character (no file can have that name)")
    parts = PurePath(name.replace("\\", "/")).parts
    if not name or PurePath(name).is_absolute() or name.startswith(("/", "\\")) or ".." in parts:
        raise UserError(f"{ann_file}: {where}: {name!r:.80} points outside the image folder "
                        "(give a path relative to --img-dir, without '..')")


def unscorable(dataset: "CocoDataset", metrics: Sequence[str] = METRICS_ALL) -> str | None:
    """Why ``dataset`` (loaded for its images only) cannot be scored with ``metrics``, or None if it can."""
    try:
        _AnnotationChecker(dataset.ann_file, tuple(metrics)).check(dataset.coco.dataset)
    except UserError as exc:
        return str(exc)
    return None


class CocoDataset:
    """Images of a COCO annotation file in file order, with the label <-> category mapping."""

    def __init__(self, ann_file: str | Path, img_dir: str | Path, metrics: Sequence[str] = METRICS_ALL):
        """``metrics``: what the set will be scored with (load_coco checks the fields they need)."""
        self.ann_file = Path(ann_file)
        self.img_dir = Path(img_dir)
        self.coco = load_coco(self.ann_file, metrics)
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
