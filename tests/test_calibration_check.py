"""The calibration check (float against fake quant after calibration) and the spread-out choice of images."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from repq_export.data.calibration_choice import holdout_indices, spread_indices
from repq_export.data.coco import CocoDataset
from repq_export.data.synthetic import make_synthetic_coco
from repq_export.evaluation.calibration_check import (ImagePair, bound_for, check_calibration,
                                                      format_check)
from repq_export.export.artifact import ExportRequest, calibration_paths, holdout_paths
from repq_export.runtime.base import NetOutput

# ----------------------------------------------------------------------------- which images calibrate


def test_spread_starts_at_the_first_image_and_covers_the_set():
    assert spread_indices(40, 1) == [0]  # the reference's choice
    assert spread_indices(40, 8) == [0, 5, 10, 15, 20, 25, 30, 35]
    assert spread_indices(10, 4) == [0, 2, 5, 7]
    assert spread_indices(3, 8) == [0, 1, 2]  # all, when asked for more than there are
    assert spread_indices(0, 8) == []


def test_holdout_is_spread_and_disjoint_from_calibration():
    taken = spread_indices(40, 8)
    held = holdout_indices(40, taken, 8)
    assert len(held) == 8 and not set(held) & set(taken)
    assert held == [1, 6, 11, 16, 21, 26, 31, 36]  # spread over the 32 left, from the first of them
    assert holdout_indices(2, [0], 8) == [1]
    assert holdout_indices(1, [0], 8) == []


def test_calibration_and_holdout_paths_of_a_folder(tmp_path):
    folder = tmp_path / "calib"
    folder.mkdir()
    for i in range(10):
        (folder / f"{i:02d}.png").write_bytes(b"")  # only names are read here
    req = ExportRequest(ckpt=tmp_path / "m.pth", out=tmp_path / "out", w_bits=8, a_bits=8, calib_dir=folder,
                        calib_images=4, holdout=3)
    assert [p.name for p in calibration_paths(req)] == ["00.png", "02.png", "05.png", "07.png"]
    held = [p.name for p in holdout_paths(req)]
    assert held == ["01.png", "04.png", "08.png"]
    req.calib_images, req.holdout = 1, 0
    assert [p.name for p in calibration_paths(req)] == ["00.png"] and holdout_paths(req) == []


def test_calibration_paths_of_an_annotation_file_follow_annotation_order(tmp_path):
    ann = make_synthetic_coco(tmp_path / "set", "val", 6, seed=3)
    req = ExportRequest(ckpt=tmp_path / "m.pth", out=tmp_path / "out", w_bits=8, a_bits=8, calib_ann=ann,
                        calib_img_dir=tmp_path / "set" / "val", calib_images=1, holdout=2)
    dataset = CocoDataset(ann, tmp_path / "set" / "val")
    assert calibration_paths(req) == [dataset[0][1]]
    assert holdout_paths(req) == [dataset[1][1], dataset[3][1]]
    req.calib_images = 3
    assert calibration_paths(req) == [dataset[0][1], dataset[2][1], dataset[4][1]]


# ----------------------------------------------------------------------------- the judgement


def net(boxes: list[list[float]], scores: list[float], labels: list[int]) -> NetOutput:
    masks = torch.zeros(len(boxes), 28, 28)
    masks[:, 4:24, 4:24] = 1.0
    return NetOutput(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), torch.tensor(scores),
                     torch.tensor(labels, dtype=torch.int64), masks)


FLOAT = net([[0, 0, 10, 10], [20, 20, 40, 40], [50, 50, 60, 70], [5, 60, 25, 90]], [0.9, 0.8, 0.7, 0.1], [0, 1, 2, 3])


def test_identical_outputs_pass_with_every_detection_matched():
    check = check_calibration([ImagePair("a.png", FLOAT, FLOAT)], [ImagePair("b.png", FLOAT, FLOAT)], 8)
    assert check.ok and check.verdict() == "PASS" and check.failures == []
    assert [s.name for s in check.sets] == ["calibration", "held-out", "all"]
    s = check.judged
    assert (s.images, s.float_detections, s.float_found, s.quant_detections, s.quant_found) == (2, 6, 6, 6, 6)
    assert s.matched_share == 1.0  # the 0.1 detection is below the score floor and not counted
    assert s.box_delta is None  # no annotations: no AP


def test_a_weaker_score_is_no_miss():
    weaker = net([[0, 0, 10, 10], [20, 20, 40, 40], [50, 50, 60, 70]], [0.9, 0.8, 0.25], [0, 1, 2])
    s = check_calibration([ImagePair("a.png", FLOAT, weaker)], [], 8).judged
    assert (s.float_detections, s.float_found, s.quant_detections, s.quant_found) == (3, 3, 2, 2)


def test_a_model_that_lost_its_detections_fails_and_says_by_how_much():
    lost = net([[0, 0, 10, 10], [30, 30, 50, 50]], [0.9, 0.8], [0, 1])  # one box moved off, one gone
    check = check_calibration([ImagePair("a.png", FLOAT, FLOAT)], [ImagePair("b.png", FLOAT, lost)], 8)
    held, judged = check.sets[1], check.judged
    assert (held.float_detections, held.float_found, held.quant_detections, held.quant_found) == (3, 1, 2, 1)
    assert held.matched_share == pytest.approx(2 / 5)
    assert judged.matched_share == pytest.approx(8 / 11)  # judged on all images together
    assert not check.ok and check.failures == ["matched 72.7% < 80%"]
    block = check.as_dict()
    assert block["verdict"] == "FAIL" and block["judged_on"] == "all"
    assert block["sets"]["held-out"]["float_found"] == 1 and block["images"]["held-out"] == ["b.png"]
    assert "FAIL on 2 image(s): matched 72.7%" in format_check(check)


def test_the_bound_is_looser_at_four_bits_and_below():
    assert bound_for(8) == bound_for(5) == (0.80, 0.05)
    assert bound_for(4) == bound_for(2) == (0.70, 0.10)
    four = net([[0, 0, 10, 10], [20, 20, 40, 40], [50, 50, 60, 70], [5, 60, 25, 90]], [0.9, 0.8, 0.7, 0.6],
               [0, 1, 2, 3])
    moved = net([[0, 0, 10, 10], [20, 20, 40, 40], [50, 50, 60, 70], [45, 60, 65, 90]], [0.9, 0.8, 0.7, 0.6],
                [0, 1, 2, 3])  # the 4th moved off: 3 of 4 matched
    pairs = [ImagePair("a.png", four, moved)]
    assert check_calibration(pairs, [], 4).judged.matched_share == 0.75
    assert check_calibration(pairs, [], 4).ok  # 75% >= 70%
    assert check_calibration(pairs, [], 6).failures == ["matched 75.0% < 80%"]
