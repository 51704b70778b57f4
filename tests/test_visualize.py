"""Pictures: detections drawn on an image, two runs side by side, the per-layer error plot, and
`repq-export predict` / `tools/parity_check.py --save-images --save-plot` end to end on a tiny artifact."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import torch

from cli_helpers import call_main, tiny_artifact
from repq_export import cli
from repq_export.commands import parity_tool
from repq_export.data.rle import mask_to_rle
from repq_export.data.postprocess import Detections
from repq_export.errors import UserError
from repq_export.evaluation.layer_errors import (LayerError, attach_code_mismatches,
                                                 measure_layer_errors)
from repq_export.evaluation.parity import CodeReport
from repq_export.quantizer_calls import scope_to_name
from repq_export.evaluation.visualize import (ROLE_COLORS, _nice_ceiling, class_color, detector_part,
                                              draw_detections, plot_layer_errors, render_layer_errors,
                                              side_by_side, write_image)
from repq_export.artifact.artifact_file import Artifact
from repq_export.artifact.detector import fake_quant_model
from repq_export.quant.layers import named_quantizers

H, W, GRAY = 120, 160, 128
CLASSES = ("ellipse", "rectangle", "triangle", "star")


def detections(with_binary: bool = False) -> Detections:
    """Two detections on a 120x160 image: a confident rectangle (label 1) and a weak star (label 3)."""
    masks = np.zeros((2, H, W), bool)
    masks[0, 50:90, 40:100] = True  # fills box 0 (40, 50) - (100, 90) exactly
    masks[1, 10:30, 120:150] = True
    return Detections(boxes=np.array([[40, 50, 100, 90], [120, 10, 150, 30]], np.float32),
                      scores=np.array([0.9, 0.2], np.float32), labels=np.array([1, 3]),
                      masks=[mask_to_rle(m) for m in masks], binary_masks=masks if with_binary else None)


@pytest.fixture
def image() -> np.ndarray:
    return np.full((H, W, 3), GRAY, np.uint8)


def label_tab_corner(text: str, shape: tuple[int, ...], x: int = 40, y: int = 50) -> tuple[int, int]:
    """(top row, right column) of the filled tab `draw_detections` puts over a box whose corner is (x, y)."""
    from repq_export.evaluation.visualize import FONT, _text_style

    scale, thickness = _text_style(shape)
    (tw, th), base = cv2.getTextSize(text, FONT, scale, max(1, thickness - 1))
    return y - th - base - 2, x + tw + 4


def test_draw_detections_blends_masks_and_draws_boxes(image):
    out = draw_detections(image, detections(), CLASSES, score_thr=0.3)
    assert out.shape == image.shape and out.dtype == np.uint8
    assert (image == GRAY).all()  # the input is left alone
    color = np.array(class_color(1), np.float64)
    blended = np.round(GRAY * (1 - 0.45) + color * 0.45)
    np.testing.assert_array_equal(out[70, 70], blended)  # inside the mask, away from outline and label
    np.testing.assert_array_equal(out[70, 40], class_color(1))  # on the box's left edge
    assert (out[10:30, 120:150] == GRAY).all()  # score 0.2 is below the threshold: not drawn
    assert (out[100:, :] == GRAY).all()  # below every detection nothing changes
    # the 'rectangle 0.90' tab sits on top of the box: its rectangle is measured with the OpenCV that draws it,
    # and only its colours are asserted (how a font rasterizes differs between OpenCV builds)
    tab_top, tab_right = label_tab_corner("rectangle 0.90", image.shape)
    tab = out[tab_top:51, 40:tab_right + 1].reshape(-1, 3).astype(int)
    color = np.array(class_color(1))
    assert (tab >= color).all()  # the tab's colour, or blended towards its white ink: never the image below
    assert (tab == color).all(axis=1).any() and (tab > color + 60).all(axis=1).any()  # colour and white text
    assert (out[tab_top - 1, 40:tab_right + 1] == GRAY).all()  # nothing above the tab


def test_draw_detections_lower_threshold_and_binary_masks(image):
    low = draw_detections(image, detections(), CLASSES, score_thr=0.1)
    assert (low[15:25, 125:145] != GRAY).any(axis=2).all()  # the star is drawn now
    same = draw_detections(image, detections(with_binary=True), CLASSES, score_thr=0.1)
    np.testing.assert_array_equal(low, same)  # kept binary masks and decoded RLEs draw the same picture
    unnamed = draw_detections(image, detections(), None, score_thr=0.1)  # no class names: 'class N'
    assert unnamed.shape == image.shape and not np.array_equal(unnamed, low)


def test_side_by_side_shape_and_panels(image):
    ref = detections()
    got = Detections(ref.boxes[:1] + 4, ref.scores[:1], ref.labels[:1], ref.masks[:1])
    both = side_by_side(image, ref, got, CLASSES, ("fake quant W4A4", "ort"), score_thr=0.3, gap=8)
    title_h = both.shape[0] - H
    assert 15 < title_h < 40 and both.shape == (H + title_h, 2 * W + 8, 3)
    np.testing.assert_array_equal(both[title_h:, :W], draw_detections(image, ref, CLASSES, 0.3))
    np.testing.assert_array_equal(both[title_h:, W + 8:], draw_detections(image, got, CLASSES, 0.3))
    assert (both[:, W:W + 8] == 255).all()
    assert (both[:title_h] < 100).any()  # the titles are written


def test_write_image_is_atomic_and_checks_the_name(tmp_path, image):
    path = write_image(tmp_path / "a.png", image)
    np.testing.assert_array_equal(cv2.imread(str(path)), image)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png"]
    with pytest.raises(UserError, match="b.gif"):
        write_image(tmp_path / "b.gif", image)
    with pytest.raises(UserError, match="cannot write"):
        write_image(tmp_path / "no" / "c.png", image)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png"]


# ----------------------------------------------------------------------------- the layer error plot


def test_nice_ceiling():
    assert _nice_ceiling(14.6) == (16, 2)
    assert _nice_ceiling(0.37) == pytest.approx((0.4, 0.05))
    assert _nice_ceiling(100.0) == (100, 10)
    assert _nice_ceiling(0.0) == (1.0, 0.2)


def test_detector_part_and_call_names():
    assert detector_part("backbone.layers.2.blocks.1.attn.qkv.input_quantizer") == "stage 3"
    assert detector_part("backbone.patch_embed.proj.weight_quantizer") == "patch embed"
    assert detector_part("roi_head.bbox_head.1.shared_convs.0.conv.input_quantizer") == "box head 2"
    assert detector_part("roi_head.mask_head.convs.0.conv.input_quantizer") == "mask head"
    assert scope_to_name("/rpn_head/rpn_conv/input_quantizer_3") == "rpn_head.rpn_conv.input_quantizer"
    rows = [LayerError("rpn_head.rpn_conv.input_quantizer", "activation", 4, 0.1, 5),
            LayerError("neck.fpn_convs.0.conv.input_quantizer", "activation", 4, 0.1, 1)]
    attach_code_mismatches(rows, [CodeReport("/rpn_head/rpn_conv/input_quantizer", "uniform", 100, 3, 1),
                                  CodeReport("/rpn_head/rpn_conv/input_quantizer_1", "uniform", 100, 2, 0)])
    assert rows[0].code_mismatches == 4 and rows[1].code_mismatches is None  # 3 - 1 tie + 2


def test_render_layer_errors_bar_heights(tmp_path):
    rows = [LayerError("backbone.patch_embed.proj.input_quantizer", "activation", 8, 0.02, 1),
            LayerError("backbone.layers.0.blocks.0.attn.qkv.weight_quantizer", "weight", 4, 0.10, 1),
            LayerError("backbone.layers.0.blocks.0.attn.matmul2.quantizer_a", "softmax", 4, 0.05, 1, 7)]
    img = render_layer_errors(rows, "test")
    assert img.shape == (520, 900, 3)
    plot_h, bottom, left, bar = 520 - 78 - 96, 520 - 96, 78, 14  # the layout of render_layer_errors
    for i, row in enumerate(rows):  # axis top: 10 %; a bar of e % is e/10 of the plot's height
        column = img[bottom - plot_h:bottom, left + i * bar + 5]  # the plot area only
        height = int((column == ROLE_COLORS[row.role]).all(axis=1).sum())
        assert abs(height - plot_h * row.rel_error / 0.10) <= 1, (row.name, height)
    assert ((img == (0, 0, 220)).all(axis=2)).any()  # the red tier-1 marker of the third row
    path = plot_layer_errors(rows, tmp_path / "plot.png", "test")
    np.testing.assert_array_equal(cv2.imread(str(path)), img)


# ----------------------------------------------------------------------------- on the tiny artifact


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    return tiny_artifact(tmp_path_factory)


def test_measure_layer_errors_matches_a_direct_computation(art):
    qmodel = fake_quant_model(Artifact.open(art.path))
    torch.manual_seed(0)
    img, img_hw = torch.randn(1, 3, 160, 224), torch.tensor([150.0, 210.0])
    rows = measure_layer_errors(qmodel, [(img, img_hw)])
    quantizers = dict(named_quantizers(qmodel))
    assert rows[0].name.startswith("backbone.patch_embed.proj.")  # forward order
    assert len({r.name for r in rows}) == len(rows) and set(r.name for r in rows) <= set(quantizers)
    assert {r.role for r in rows} == {"weight", "activation", "softmax"}
    assert all(0 < r.rel_error < 1 for r in rows)
    layer = qmodel.backbone.layers[0].blocks[0].attn.qkv  # a weight: ||q(w) - w|| / ||w|| directly
    with torch.no_grad():
        want = float((layer.weight_quantizer(layer.weight) - layer.weight).norm() / layer.weight.norm())
    row = next(r for r in rows if r.name == "backbone.layers.0.blocks.0.attn.qkv.weight_quantizer")
    assert row.rel_error == pytest.approx(want, rel=1e-6) and row.bits == 4 and row.calls == 1
    rpn = next(r for r in rows if r.name == "rpn_head.rpn_conv.input_quantizer")
    assert rpn.calls == 5  # one call per FPN level
    assert not any(h for q in quantizers.values() for h in q._forward_hooks.values())  # hooks removed


def test_predict_writes_a_picture(art, tmp_path, capsys):
    image = art.img_dir / "000000000001.png"
    original = cv2.imread(str(image))
    for backend in ("ort", "quant"):
        out = tmp_path / f"pred_{backend}.png"
        result = call_main(cli.main, ["predict", art.path, image, "--save", out, "--backend", backend,
                                      "--score-thr", "0.05"], capsys)
        assert result.rc == 0, result.err
        assert result.out.startswith(f"wrote {out}: ") and f"{backend} backend, W4A4" in result.out
        drawn = cv2.imread(str(out))
        assert drawn.shape == original.shape and (drawn != original).any()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pred_ort.png", "pred_quant.png"]


def test_parity_check_saves_pictures_and_plot(art, tmp_path, capsys):
    pictures, plot = tmp_path / "pictures", tmp_path / "layers.png"
    result = call_main(parity_tool.main, [art.path, "--ann", art.ann, "--img-dir", art.img_dir, "--max-images", 1,
                                          "--quiet", "--save-images", pictures, "--save-plot", plot], capsys)
    assert result.rc in (0, 1), result.err  # the verdict of a random-weight model is not the point here
    assert f"wrote {plot}" in result.out
    (picture,) = pictures.iterdir()
    image = cv2.imread(str(art.img_dir / "000000000001.png"))
    both = cv2.imread(str(picture))
    assert picture.name == "000000000001.png"
    assert both.shape[1] == 2 * image.shape[1] + 8 and 15 < both.shape[0] - image.shape[0] < 40
    assert cv2.imread(str(plot)).shape[0] == 520


def test_parity_check_noise_floor_is_reported(art, tmp_path, capsys):
    report = tmp_path / "parity.json"
    result = call_main(parity_tool.main, [art.path, "--ann", art.ann, "--img-dir", art.img_dir, "--max-images", 2,
                                          "--quiet", "--noise-floor", "3", "--noise-ulps", "auto", "--json-out", report],
                       capsys)
    assert result.rc in (0, 1), result.err
    assert "noise floor over 3 sample(s)" in result.out and "ort is with" in result.out
    parity = json.loads(report.read_text())
    floor = parity["noise_floor"]
    diff = parity["tier1_codes"]["float_difference"]  # torch vs onnxruntime inputs, both fed the same codes
    assert diff["values"] > 100_000 and 0 <= diff["differ"] <= diff["values"] and diff["equivalent_ulps"] >= 0
    assert "float parts        fed the same codes" in result.out
    assert [s["direction"] for s in floor["samples"]] == ["up", "down", "random"]
    assert all(s["per_quantizer"] and 0 < s["ulps"] < 16 for s in floor["samples"])  # auto: as measured
    for s in floor["samples"]:
        assert s["nudged_quantizers"] > 20 and 0.0 <= s["match_rate"] <= 1.0
        assert abs(s["bbox_mAP_delta"]) <= 1.0 and abs(s["segm_mAP_delta"]) <= 1.0
    assert floor["lowest_match_rate"] == min(s["match_rate"] for s in floor["samples"])
    assert floor["largest_bbox_mAP_delta"] == max(abs(s["bbox_mAP_delta"]) for s in floor["samples"])
    assert isinstance(floor["backend_within"], bool)
