"""The calibration check (float against fake quant after calibration) and the spread-out choice of images."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from cli_helpers import TINY_MASK, call_main, make_checkpoint, make_coco, one_error

from repq_export import cli

from repq_export.data.calibration_choice import holdout_indices, spread_indices
from repq_export.data.coco import CocoDataset
from repq_export.data.synthetic import make_synthetic_coco
from repq_export.evaluation.calibration_check import (ImagePair, bound_for, check_calibration,
                                                      format_check)
from repq_export.data.calibration_choice import CalibrationSource, calibration_paths, choose_calibration, holdout_paths
from repq_export.export.artifact import ExportRequest
from repq_export.boundary import NetOutput

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
    source = CalibrationSource(folder=folder)
    assert [p.name for p in calibration_paths(source, 4)] == ["00.png", "02.png", "05.png", "07.png"]
    held = [p.name for p in holdout_paths(source, 4, 3)]
    assert held == ["01.png", "04.png", "08.png"]
    assert [p.name for p in calibration_paths(source, 1)] == ["00.png"] and holdout_paths(source, 1, 0) == []


def test_calibration_paths_of_an_annotation_file_follow_annotation_order(tmp_path):
    ann = make_synthetic_coco(tmp_path / "set", "val", 6, seed=3)
    req = ExportRequest(ckpt=tmp_path / "m.pth", out=tmp_path / "out", w_bits=8, a_bits=8, calib_ann=ann,
                        calib_img_dir=tmp_path / "set" / "val", calib_images=1, holdout=2)
    dataset = CocoDataset(ann, tmp_path / "set" / "val")
    choice = choose_calibration(req.calibration_source(), req.calib_images, req.holdout)
    assert choice.images == [dataset[0][1]] and choice.held == [dataset[1][1], dataset[3][1]]
    assert choice.dataset is not None and choice.unscorable is None
    source = req.calibration_source()
    assert source.dataset() is source.dataset()  # the annotation file is read once per source
    assert calibration_paths(req.calibration_source(), 3) == [dataset[0][1], dataset[2][1], dataset[4][1]]


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
    assert not check.ok and check.failures == ["matched 72.7% < 90%"]
    block = check.as_dict()
    assert block["verdict"] == "FAIL" and block["judged_on"] == "all"
    assert block["sets"]["held-out"]["float_found"] == 1 and block["images"]["held-out"] == ["b.png"]
    assert "FAIL on 2 image(s): matched 72.7%" in format_check(check)


def test_the_bound_is_looser_at_four_bits_and_below():
    assert bound_for(8) == bound_for(5) == (0.90, 0.05)
    assert bound_for(4) == bound_for(2) == (0.80, 0.10)
    boxes = [[30 * i, 0, 30 * i + 20, 20] for i in range(7)]
    seven = net(boxes, [0.9] * 7, [0] * 7)
    moved = net(boxes[:6] + [[180, 40, 200, 60]], [0.9] * 7, [0] * 7)  # the 7th moved off: 6 of 7 matched
    pairs = [ImagePair("a.png", seven, moved)]
    assert check_calibration(pairs, [], 4).judged.matched_share == pytest.approx(12 / 14)
    assert check_calibration(pairs, [], 4).ok  # 85.7% >= 80%
    assert check_calibration(pairs, [], 6).failures == ["matched 85.7% < 90%"]


# ----------------------------------------------------------------------------- the check in `repq-export`


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random tiny checkpoint; a folder of 3 synthetic images; the same with a near-constant image first."""
    root = tmp_path_factory.mktemp("calibcheck")
    ckpt = make_checkpoint(root / "tiny.pth")
    _, img_dir = make_coco(root / "coco", num_images=3)
    flat_dir = root / "flat_first"
    flat_dir.mkdir()
    for i, image in enumerate(sorted(img_dir.iterdir())):
        shutil.copy(image, flat_dir / f"b{i}.png")
    rng = np.random.default_rng(0)
    # low-contrast noise: enough grey levels to pass the flat-image refusal, nothing like the real images
    near_constant = np.full((64, 96, 3), 120, np.uint8) + rng.integers(0, 16, (64, 96, 3)).astype(np.uint8)
    cv2.imwrite(str(flat_dir / "a_flat.png"), near_constant)  # sorted first: the one calibration image
    return root, ckpt, img_dir, flat_dir


def export_argv(root: Path, ckpt: Path, calib: Path, out: str, *extra) -> list:
    # W8A8: the tiny random model keeps most of its confident detections at 8 bits when calibrated on real
    # images (not at 4, where a random network's outputs scatter), so 8 bits can show a pass and a failure
    return ["--ckpt", ckpt, "--config", TINY_MASK, "--bits", 8, "--calib", calib, "--out", root / out, "--quiet",
            *extra]


def test_a_good_calibration_of_the_bundled_detector_passes(tmp_path):
    """Bundled Mask R-CNN, W8A8 on 2 images spread over a synthetic set, checked on 3 held-out ones: PASS,
    every figure within the bound (a random tiny model is no accurate model: it cannot show a pass)."""
    from repq_export.commands.demo import BUNDLED
    from repq_export.export.artifact import calibrate_and_check
    from repq_export.models.checkpoint import load_checkpoint

    _, ckpt, config = BUNDLED[0]
    ann = make_synthetic_coco(tmp_path / "set", "val", 5, seed=7)
    req = ExportRequest(ckpt=ckpt, out=tmp_path / "out", w_bits=8, a_bits=8, config=config, calib_ann=ann,
                        calib_img_dir=tmp_path / "set" / "val", calib_images=2, holdout=3)
    detector, info = load_checkpoint(ckpt, config)
    choice = choose_calibration(req.calibration_source(), req.calib_images, req.holdout)
    _, check, _ = calibrate_and_check(detector, choice.images, choice.held, info.preprocess, choice.dataset, req,
                                      False)
    block = check.as_dict()
    assert block["images"] == {"calibration": ["000000000001.png", "000000000003.png"],
                               "held-out": ["000000000002.png", "000000000004.png", "000000000005.png"]}
    assert block["verdict"] == "PASS" and block["failures"] == [], format_check(check)
    judged = block["sets"]["all"]
    assert judged["images"] == 5 and judged["matched_share"] >= 0.90
    assert judged["box_ap_delta"] >= -0.05 and judged["mask_ap_delta"] >= -0.05
    assert 0.5 < judged["box_ap_float"] <= 1.0  # scored against the annotations


def test_a_near_constant_calibration_image_is_refused_with_the_figures(tiny, capsys):
    root, ckpt, _, flat_dir = tiny
    result = call_main(cli.main, export_argv(root, ckpt, flat_dir, "bad", "--calib-images", 1, "--holdout", 3), capsys)
    assert result.rc == 2 and not (root / "bad").exists()
    line = one_error(result, "calibration check FAILED", "nothing was written", "--accept-accuracy-loss")
    share = float(line.split("matched ")[1].split("%")[0])
    assert share < 90.0  # the figure that failed is in the error
    assert "calibrating W8A8 on 1 image(s): a_flat.png" in result.out
    held = next(r for r in result.out.splitlines() if r.startswith("| held-out | 3 |"))
    assert float(held.split("|")[4].strip(" %")) < 90.0  # the misfit shows on the held-out images


def test_accept_accuracy_loss_writes_the_artifact_and_records_the_failure(tiny, capsys):
    root, ckpt, _, flat_dir = tiny
    result = call_main(cli.main, export_argv(root, ckpt, flat_dir, "accepted", "--calib-images", 1, "--holdout", 3,
                                             "--accept-accuracy-loss"), capsys)
    assert result.rc == 0, result.err
    assert "WARNING: calibration check FAILED" in result.out
    manifest = json.loads((root / "accepted" / "repq.json").read_text())
    block = manifest["calibration_check"]
    assert block["verdict"] == "FAIL" and block["judged_on"] == "all"
    assert block["bound"] == {"min_matched_share": 0.90, "max_ap_loss": 0.05, "bits": 8}
    assert block["sets"]["all"]["matched_share"] < 0.90
    assert block["failures"] == [f"matched {100 * block['sets']['all']['matched_share']:.1f}% < 90%"]
    assert block["sets"]["held-out"]["matched_share"] < block["sets"]["calibration"]["matched_share"]
    assert [c["name"] for c in manifest["calibration_images"]] == ["a_flat.png"]  # --calib-images 1: the first


def test_one_calibration_image_is_the_reference_calibration_bit_for_bit(tiny, capsys):
    """`--calib-images 1`: the first image, calibrated exactly as before the check existed (the check runs
    the float model first and the quantized one after, and changes no state)."""
    from repq_export.data.images import preprocess_file
    from repq_export.models.checkpoint import load_checkpoint
    from repq_export.quant.calibrate import quantize
    from repq_export.quant.state import read_quant_state

    root, ckpt, img_dir, _ = tiny
    result = call_main(cli.main, export_argv(root, ckpt, img_dir, "one", "--calib-images", 1, "--holdout", 0,
                                             "--accept-accuracy-loss"), capsys)
    assert result.rc == 0, result.err
    detector, info = load_checkpoint(ckpt, TINY_MASK)
    prep = preprocess_file(img_dir / "000000000001.png", info.preprocess)
    direct = quantize(detector, [(prep.tensor, prep.img_hw_tensor)], 8, 8, progress=False).state_dict()
    _, saved = read_quant_state(root / "one" / "quant.pth")
    assert saved.keys() == direct.keys()
    assert all(torch.equal(saved[k], direct[k]) for k in saved)
