"""The synthetic COCO set: deterministic, consistent annotations, real occlusion."""
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from pycocotools.coco import COCO

from repq_export.data.synthetic import (
    CATEGORIES,
    CLASS_COLOURS,
    MAX_OBJECTS,
    MIN_EXTENT,
    MIN_VISIBLE_FRACTION,
    MIN_VISIBLE_PIXELS,
    keep_visible,
    make_synthetic_coco,
    synthesize_image,
    visible_masks,
)
from repq_export.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("syn")
    return out, make_synthetic_coco(out, "val", num_images=12, seed=3)


def all_files(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout_and_byte_identical_reruns(dataset, tmp_path):
    out, ann_file = dataset
    assert ann_file == out / "annotations" / "instances_val.json"
    names = sorted(p.name for p in (out / "val").iterdir())
    assert names == [f"{i:012d}.png" for i in range(1, 13)]
    make_synthetic_coco(tmp_path, "val", num_images=12, seed=3)
    assert all_files(out) == all_files(tmp_path)


def test_seed_and_split_change_the_content():
    base, _ = synthesize_image(3, "val", 0)
    for seed, split in ((4, "val"), (3, "train")):
        other, _ = synthesize_image(seed, split, 0)
        assert other.shape != base.shape or not np.array_equal(other, base)


def test_annotations_load_and_match_the_masks(dataset):
    out, ann_file = dataset
    coco = COCO(str(ann_file))
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(CATEGORIES)
    assert coco.getImgIds() == list(range(1, 13))
    for image_id in coco.getImgIds():
        info = coco.imgs[image_id]
        img = cv2.imread(str(out / "val" / info["file_name"]))
        assert img.shape == (info["height"], info["width"], 3)
        assert 240 <= img.shape[0] <= 520 and 240 <= img.shape[1] <= 520
        anns = coco.imgToAnns[image_id]
        assert len(anns) <= MAX_OBJECTS
        owner = np.zeros(img.shape[:2], int)
        for ann in anns:
            mask = coco.annToMask(ann).astype(bool)
            rows, cols = np.nonzero(mask)
            assert ann["area"] == mask.sum() >= MIN_VISIBLE_PIXELS
            x, y = cols.min(), rows.min()
            assert ann["bbox"] == [x, y, cols.max() - x + 1, rows.max() - y + 1]
            assert ann["iscrowd"] == 0 and 1 <= ann["category_id"] <= 4
            owner += mask
        assert owner.max() <= 1  # visible masks never overlap


def test_image_content_does_not_depend_on_the_image_count(dataset):
    out, _ = dataset
    img, _ = synthesize_image(3, "val", 4)
    np.testing.assert_array_equal(cv2.imread(str(out / "val" / "000000000005.png")), img)


def test_later_objects_occlude_earlier_ones():
    a = np.zeros((10, 10), bool)
    a[0:6, 0:6] = True
    b = np.zeros((10, 10), bool)
    b[3:9, 3:9] = True
    vis_a, vis_b = visible_masks([a, b])
    assert vis_a.sum() == 36 - 9 and not (vis_a & b).any()
    np.testing.assert_array_equal(vis_b, b)


def test_hidden_objects_are_dropped():
    big = np.zeros((40, 40), bool)
    big[0:30, 0:30] = True
    hidden = np.zeros((40, 40), bool)
    hidden[5:25, 5:25] = True
    peeking = np.zeros((40, 40), bool)
    peeking[20:40, 20:40] = True  # 336 of its 400 pixels stay visible
    top = np.zeros((40, 40), bool)
    top[2:28, 2:28] = True  # covers `hidden` entirely
    assert keep_visible([hidden, peeking, top]) == [1, 2]
    assert keep_visible([big, top]) == [1]  # big keeps 900 - 676 = 224 < 50 % of 900


def test_dataset_has_occlusion_sizes_and_all_classes():
    instances = [inst for i in range(30) for inst in synthesize_image(0, "val", i)[1]]
    areas = np.array([inst.mask.sum() for inst in instances])
    assert {inst.label for inst in instances} == set(range(len(CATEGORIES)))
    assert (areas < 32**2).any() and (areas > 96**2).any()  # COCO small and large objects
    boxes = [np.nonzero(inst.mask.any(axis=0))[0] for inst in instances if inst.mask.sum() == inst.full_area]
    assert min(cols[-1] - cols[0] + 1 for cols in boxes) >= MIN_EXTENT * 0.45  # no unmatchable specks
    occluded = [inst for inst in instances if inst.mask.sum() < inst.full_area]
    assert occluded, "no object lost pixels to occlusion"
    assert all(inst.mask.sum() >= MIN_VISIBLE_FRACTION * inst.full_area for inst in occluded)


@pytest.mark.parametrize(
    "kwargs, option",
    [({"num_images": 0}, "--num-images"), ({"split": "a/b"}, "--split"), ({"seed": -1}, "--seed")],
)
def test_bad_arguments(tmp_path, kwargs, option):
    with pytest.raises(UserError, match=option):
        make_synthetic_coco(tmp_path, **{"split": "val", "num_images": 1, "seed": 0, **kwargs})


def test_output_path_that_is_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(UserError, match="not a directory"):
        make_synthetic_coco(tmp_path / "f", "val", 1, 0)


def test_command_line(tmp_path):
    tool = [sys.executable, str(ROOT / "tools" / "make_synthetic_coco.py")]
    help_text = subprocess.run([*tool, "--help"], capture_output=True, text=True, check=True).stdout
    assert "--num-images" in help_text and "instances_{split}.json" in help_text
    done = subprocess.run([*tool, "--out", str(tmp_path), "--num-images", "2", "--seed", "1"],
                          capture_output=True, text=True)
    assert done.returncode == 0 and (tmp_path / "val" / "000000000002.png").is_file()
    assert done.stdout.strip() == str(tmp_path / "annotations" / "instances_val.json")
    bad = subprocess.run([*tool, "--out", str(tmp_path), "--num-images", "0"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error: --num-images")


def test_each_class_wears_its_own_colour():
    anchors = np.array(CLASS_COLOURS, dtype=np.float64)
    hits, total = 0, 0
    for i in range(30):
        img, instances = synthesize_image(0, "val", i)
        for inst in instances:
            mean = img[inst.mask].mean(axis=0)
            hits += int(np.linalg.norm(anchors - mean, axis=1).argmin() == inst.label)
            total += 1
    assert total > 60 and hits / total >= 0.95, (hits, total)
