"""COCO reading (file order, label mapping, errors), result records, and COCO AP."""
import contextlib
import io
import json

import numpy as np
import pytest
import torch
import pycocotools.mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from repq_export.data.coco import CocoDataset
from repq_export.data.coco_results import to_coco_results
from repq_export.data.postprocess import Detections, postprocess
from repq_export.data.rle import mask_to_rle
from repq_export.data.transforms import preprocess
from repq_export.errors import UserError
from repq_export.evaluation.coco_eval import evaluate_coco, format_ap_table

# boxes (x0, y0, x1, y1, category_id) of the ground truth, per image id; image ids deliberately
# not sorted, categories listed with ids out of order
GT_BOXES = {
    42: [(10, 20, 66, 50, 5), (70, 5, 140, 95, 2)],
    7: [(0, 0, 30, 30, 2), (0, 30, 150, 100, 5)],
    13: [(5, 40, 145, 98, 5), (100, 2, 112, 14, 5)],
}
HW = (100, 150)


def rect_mask(x0, y0, x1, y1):
    m = np.zeros(HW, bool)
    m[y0:y1, x0:x1] = True
    return m


@pytest.fixture
def gt_file(tmp_path):
    images, anns = [], []
    for image_id, boxes in GT_BOXES.items():
        name = f"img{image_id}.png"
        images.append({"id": image_id, "file_name": name, "height": HW[0], "width": HW[1]})
        for x0, y0, x1, y1, cat in boxes:
            anns.append({
                "id": len(anns) + 1, "image_id": image_id, "category_id": cat, "iscrowd": 0,
                "bbox": [x0, y0, x1 - x0, y1 - y0], "area": float((x1 - x0) * (y1 - y0)),
                "segmentation": mask_to_rle(rect_mask(x0, y0, x1, y1)),
            })
    categories = [{"id": 5, "name": "five"}, {"id": 2, "name": "two"}]
    path = tmp_path / "instances.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": categories}))
    return path


def test_dataset_keeps_file_order_and_category_order(gt_file, tmp_path):
    ds = CocoDataset(gt_file, tmp_path / "imgs")
    assert len(ds) == 3
    assert [info["id"] for info, _ in ds] == [42, 7, 13]
    assert [path for _, path in ds] == [tmp_path / "imgs" / f"img{i}.png" for i in (42, 7, 13)]
    assert ds.classes == ("five", "two") and ds.cat_ids == [5, 2] and ds.cat2label == {5: 0, 2: 1}
    assert ds[2][0]["file_name"] == "img13.png"


ONE_IMAGE = [{"id": 1, "file_name": "a.png", "height": 4, "width": 4}]
ONE_CATEGORY = [{"id": 1, "name": "x"}]


@pytest.mark.parametrize(
    "content, problem",
    [
        ("not json {", "not a JSON file"),
        ([1, 2], "top level is not an object"),
        ({"annotations": [], "categories": ONE_CATEGORY}, "no 'images' list"),
        ({"images": ONE_IMAGE, "categories": ONE_CATEGORY}, "no 'annotations'"),
        ({"images": [], "annotations": [], "categories": ONE_CATEGORY}, "no images"),
        ({"images": ONE_IMAGE, "annotations": [], "categories": []}, "no categories"),
        ({"images": [{"id": 1}], "annotations": [], "categories": ONE_CATEGORY}, r"images\[0\]\.file_name: missing"),
        ({"images": ONE_IMAGE * 2, "annotations": [], "categories": ONE_CATEGORY}, "not unique"),
    ],
)
def test_bad_annotation_files(tmp_path, content, problem):
    path = tmp_path / "ann.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(UserError, match=problem) as err:
        CocoDataset(path, tmp_path)
    assert str(path) in str(err.value)


def test_missing_annotation_file(tmp_path):
    with pytest.raises(UserError, match="nope.json"):
        CocoDataset(tmp_path / "nope.json", tmp_path)


def make_dets(boxes, scores, labels):
    masks = [mask_to_rle(rect_mask(*(int(v) for v in b))) for b in boxes]
    boxes, scores = np.array(boxes, np.float32), np.array(scores, np.float32)
    return Detections(boxes, scores, np.array(labels, np.int64), masks)


def test_result_records_are_grouped_by_class_in_mmdet_format():
    boxes = [[1.5, 2.25, 11.5, 22.75], [3, 4, 5, 6], [7, 8, 17, 9]]
    dets = make_dets(boxes, scores=[0.9, 0.8, 0.7], labels=[1, 0, 1])
    bbox, segm = to_coco_results(dets, image_id=42, cat_ids=[5, 2])
    assert [r["category_id"] for r in bbox] == [5, 2, 2]
    assert [r["score"] for r in bbox] == pytest.approx([0.8, 0.9, 0.7])
    assert bbox[1]["bbox"] == [1.5, 2.25, 10.0, 20.5] and bbox[1]["image_id"] == 42
    assert bbox[0]["score"] == float(np.float32(0.8))  # the float32 score, exactly
    assert [r["bbox"] for r in segm] == [r["bbox"] for r in bbox]
    assert [r["score"] for r in segm] == [r["score"] for r in bbox]
    assert segm[1]["segmentation"] == dets.masks[0]
    json.dumps([bbox, segm])
    with pytest.raises(ValueError):
        to_coco_results(dets, 42, cat_ids=[5])


def gt_as_results(gt_file, shift=0.0):
    coco = COCO(str(gt_file))
    bbox, segm = [], []
    for ann in coco.dataset["annotations"]:
        x, y, w, h = ann["bbox"]
        record = {"image_id": ann["image_id"], "category_id": ann["category_id"], "score": 1.0,
                  "bbox": [x + shift * w, y, w, h]}
        bbox.append(record)
        segm.append({**record, "segmentation": ann["segmentation"]})
    return bbox, segm


def test_perfect_detections_give_ap_one(gt_file):
    metrics = evaluate_coco(gt_file, *gt_as_results(gt_file))
    for metric in ("bbox", "segm"):
        for item in ("mAP", "mAP_50", "mAP_75", "mAP_s", "mAP_m", "mAP_l", "AR@100"):
            assert metrics[f"{metric}_{item}"] == pytest.approx(1.0), (metric, item)


def test_shifted_boxes_lose_ap(gt_file):
    metrics = evaluate_coco(gt_file, gt_as_results(gt_file, shift=0.3)[0], metrics=("bbox",))
    # shifted by 0.3 w: IoU = 0.7 / 1.3 = 0.538 -> a match at IoU 0.50 only, 1 of 10 thresholds
    assert metrics["bbox_mAP_50"] == pytest.approx(1.0)
    assert metrics["bbox_mAP_75"] == pytest.approx(0.0)
    assert metrics["bbox_mAP"] == pytest.approx(0.1)
    assert "segm_mAP" not in metrics


def test_empty_results_give_zero(gt_file):
    metrics = evaluate_coco(gt_file, [], [])
    assert metrics["bbox_mAP"] == 0.0 and metrics["segm_mAP_50"] == 0.0
    with pytest.raises(UserError, match="metrics"):
        evaluate_coco(gt_file, [], [], metrics=("keypoints",))


def test_ap_table_is_what_cocoeval_prints(gt_file):
    bbox, _ = gt_as_results(gt_file, shift=0.1)
    metrics = evaluate_coco(gt_file, bbox, metrics=("bbox",))
    coco = COCO(str(gt_file))
    with contextlib.redirect_stdout(io.StringIO()):
        ev = COCOeval(coco, coco.loadRes(bbox), "bbox")
        ev.params.maxDets = [100, 300, 1000]
        ev.evaluate()
        ev.accumulate()
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        ev.summarize()
    assert format_ap_table(metrics, "bbox") == printed.getvalue()


def test_postprocessed_network_output_scores_ap_one(gt_file):
    """Network-style outputs (resized coordinates, 28x28 masks) of the ground truth -> AP 1."""
    prep = preprocess(np.zeros((*HW, 3), np.uint8), scale=(300, 200))  # factor 2
    ds = CocoDataset(gt_file, ".")
    bbox_all, segm_all = [], []
    for info, _ in ds:
        anns = ds.coco.imgToAnns[info["id"]]
        xywh = torch.tensor([a["bbox"] for a in anns])
        boxes = torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], dim=1) * 2  # resized pixels
        labels = torch.tensor([ds.cat2label[a["category_id"]] for a in anns])
        n = len(anns)
        dets = postprocess(boxes, torch.ones(n), labels, torch.ones(n, 28, 28), prep)
        bbox, segm = to_coco_results(dets, info["id"], ds.cat_ids)
        bbox_all += bbox
        segm_all += segm
    metrics = evaluate_coco(ds, bbox_all, segm_all)
    assert metrics["bbox_mAP"] == pytest.approx(1.0) and metrics["segm_mAP"] == pytest.approx(1.0)


def test_evaluation_limited_to_some_images(gt_file):
    bbox, _ = gt_as_results(gt_file)
    only_42 = [r for r in bbox if r["image_id"] == 42]
    assert evaluate_coco(gt_file, only_42, metrics=("bbox",))["bbox_mAP"] < 1.0  # misses 7 and 13
    metrics = evaluate_coco(gt_file, only_42, metrics=("bbox",), img_ids=[42])
    assert metrics["bbox_mAP"] == pytest.approx(1.0)


def test_compressed_rle_counts_read_as_pycocotools_reads_them():
    """The annotation check decodes compressed RLE strings itself (to refuse ones that do not fill the
    image before any inference): its run lengths must be pycocotools' own."""
    from repq_export.data.coco import _compressed_rle_counts

    rng = np.random.default_rng(0)
    for _ in range(100):
        h, w = (int(v) for v in rng.integers(1, 50, 2))
        mask = (rng.random((h, w)) < rng.random()).astype(np.uint8)
        rle = mask_util.encode(np.asfortranarray(mask[:, :, None]))[0]
        counts = _compressed_rle_counts(rle["counts"].decode())
        assert sum(counts) == h * w and min(counts) >= 0
        np.testing.assert_array_equal(mask_util.decode(mask_util.frPyObjects({"size": [h, w], "counts": counts}, h, w)),
                                      mask)
    assert _compressed_rle_counts("5 2") is None and _compressed_rle_counts("p") is None  # not RLE characters
