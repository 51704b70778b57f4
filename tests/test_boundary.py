"""Validation at the boundary: each input that would fail after the expensive work (inference,
calibration) is refused on entry, with one `error:` line naming the file and the field, exit 2.

"Before any model work" is shown without timing: the annotation file is refused even when the
checkpoint does not exist (it is read first), a refused export leaves no output folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from cli_helpers import CLI, TINY_MASK, call_main, make_checkpoint, one_error, run_cli, tiny_artifact
from repq_export import cli
from repq_export.commands import parity_tool, test_tool


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    return tiny_artifact(tmp_path_factory)


def edited_coco(art, tmp_path: Path, edit) -> Path:
    data = json.loads(art.ann.read_text())
    edit(data)
    path = tmp_path / "edited.json"
    path.write_text(json.dumps(data))
    return path


def _box_only(data):
    for ann in data["annotations"]:
        ann.pop("segmentation", None)


def _nul_name(data):
    data["images"][1]["file_name"] = "a\u0000b.png"


# case: (edit, fragments of the one error line)
ANNOTATIONS = {
    "box-only under bbox segm": (_box_only, ["annotations[0].segmentation", "missing"]),
    "string image id": (lambda d: d["images"][0].update(id="1"), ["images[0].id", "integer id"]),
    "string category id": (lambda d: d["categories"][1].update(id="2"), ["categories[1].id", "integer id"]),
    "string image_id in an annotation": (lambda d: d["annotations"][1].update(image_id=str(d["annotations"][1]["image_id"])),
                                         ["annotations[1].image_id", "integer id"]),
    "RLE counts a number": (lambda d: d["annotations"][0]["segmentation"].update(counts=5),
                            ["annotations[0].segmentation.counts", "string"]),
    "uncompressed RLE that does not fill the image": (
        lambda d: d["annotations"][0]["segmentation"].update(counts=[5, 5]),
        ["annotations[0].segmentation.counts", "adding up"]),
    "compressed RLE that does not fill the image": (
        lambda d: d["annotations"][0]["segmentation"].update(counts="52"),
        ["annotations[0].segmentation.counts", "compressed RLE"]),
    "RLE of another size": (lambda d: d["annotations"][0]["segmentation"].update(size=[10, 10]),
                            ["annotations[0].segmentation.size", "image's"]),
    "iscrowd 2": (lambda d: d["annotations"][2].update(iscrowd=2), ["annotations[2].iscrowd", "0 or 1"]),
    "iscrowd a string": (lambda d: d["annotations"][0].update(iscrowd="0"), ["annotations[0].iscrowd"]),
    "no area": (lambda d: d["annotations"][0].pop("area"), ["annotations[0].area", "missing"]),
    "no iscrowd": (lambda d: d["annotations"][0].pop("iscrowd"), ["annotations[0].iscrowd", "missing"]),
    "NUL in a file name": (_nul_name, ["images[1].file_name", "NUL"]),
    "duplicate annotation id": (lambda d: d["annotations"][1].update(id=d["annotations"][0]["id"]),
                                ["annotations[1].id", "not unique"]),
    "no image height": (lambda d: d["images"][0].pop("height"), ["images[0].height", "missing"]),
    "empty polygon list": (lambda d: d["annotations"][0].update(segmentation=[]), ["annotations[0].segmentation"]),
}


@pytest.mark.parametrize("case", list(ANNOTATIONS))
def test_annotation_file_refused_before_the_checkpoint_is_read(art, tmp_path, case, capsys):
    edit, fragments = ANNOTATIONS[case]
    ann = edited_coco(art, tmp_path, edit)
    absent = tmp_path / "absent.pth"  # the annotation file is judged first: this is never opened
    one_error(call_main(test_tool.main, [TINY_MASK, absent, "--ann", ann, "--img-dir", art.img_dir, "--quiet"],
                        capsys), "edited.json", *fragments)
    one_error(call_main(parity_tool.main, [tmp_path / "no-artifact", "--ann", ann, "--img-dir", art.img_dir,
                                           "--quiet"], capsys), "edited.json", *fragments)


def test_box_only_file_scores_boxes(art, tmp_path, capsys):
    """A file without masks is fine for box AP: only --eval segm needs segmentations."""
    ann = edited_coco(art, tmp_path, _box_only)
    result = call_main(test_tool.main, [TINY_MASK, art.ckpt, "--ann", ann, "--img-dir", art.img_dir, "--eval", "bbox",
                                        "--quiet"], capsys)
    assert result.rc == 0 and "bbox_mAP" in result.out, result.err


def test_calibration_file_needs_images_only(art, tmp_path, capsys):
    """--calib-ann reads images: a box-only file without areas calibrates; a NUL file name does not."""
    def strip(data):
        _box_only(data)
        for ann in data["annotations"]:
            ann.pop("area")
    ann = edited_coco(art, tmp_path, strip)
    from repq_export.data.calibration_choice import CalibrationSource, calibration_paths

    paths = calibration_paths(CalibrationSource(ann=ann, img_dir=art.img_dir), 1)
    assert paths == [art.img_dir / json.loads(art.ann.read_text())["images"][0]["file_name"]]
    ann = edited_coco(art, tmp_path, _nul_name)
    one_error(call_main(cli.main, ["--ckpt", art.ckpt, "--config", TINY_MASK, "--bits", 4, "--calib-ann", ann,
                                   "--calib-img-dir", art.img_dir, "--out", tmp_path / "out"], capsys),
              "images[1].file_name", "NUL")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ calibration options


@pytest.mark.parametrize("extra, fragments", [
    (["--calib", "CALIB", "--calib-ann", "ANN"], ["--calib", "--calib-ann", "not both"]),
    (["--calib", "CALIB", "--calib-img-dir", "CALIB"], ["--calib-img-dir", "only goes with --calib-ann"]),
])
def test_calibration_sources_are_not_silently_ignored(art, tmp_path, extra, fragments, capsys):
    argv = [{"CALIB": art.img_dir, "ANN": art.ann}.get(a, a) for a in extra]
    one_error(call_main(cli.main, ["--ckpt", art.ckpt, "--config", TINY_MASK, "--bits", 4, *argv,
                                   "--out", tmp_path / "out"], capsys), *fragments)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ test pipelines


PIPELINE = """_base_ = ['{base}']
data = dict(test=dict(pipeline=[
    dict(type='LoadImageFromFile'),
    dict(type='MultiScaleFlipAug', img_scale={scale}, flip=False, transforms=[
        dict(type='Resize', keep_ratio=True),
        dict(type='RandomFlip'),
        dict(type='Normalize', mean={mean}, std={std}, to_rgb={to_rgb}),
        dict(type='Pad', size_divisor={divisor}),
        dict(type='ImageToTensor', keys=['img']),
        dict(type='Collect', keys=['img'])])]))
"""
GOOD = dict(scale="(1333, 800)", mean="[123.675, 116.28, 103.53]", std="[58.395, 57.12, 57.375]", to_rgb="True",
            divisor="32")


@pytest.mark.parametrize("change, fragments", [
    ({"mean": "[123.675, 116.28]"}, ["Normalize.mean", "3 finite numbers"]),
    ({"std": "[58.395, 0, 57.375]"}, ["Normalize.std", "> 0"]),
    ({"std": "58.0"}, ["Normalize.std"]),
    ({"divisor": "0"}, ["Pad.size_divisor", "multiple of 32"]),
    ({"divisor": "'32'"}, ["Pad.size_divisor"]),
    ({"divisor": "33"}, ["Pad.size_divisor", "multiple of 32"]),
    ({"to_rgb": "'False'"}, ["Normalize.to_rgb", "True or False"]),
    ({"scale": "(100000, 800)"}, ["img_scale"]),
])
def test_test_pipeline_values_refused_before_calibration(art, tmp_path, change, fragments, capsys):
    config = tmp_path / "pipeline.py"
    config.write_text(PIPELINE.format(base=TINY_MASK, **{**GOOD, **change}))
    one_error(call_main(cli.main, ["--ckpt", art.ckpt, "--config", config, "--bits", 4, "--calib", art.img_dir,
                                   "--out", tmp_path / "out", "--quiet"], capsys), "pipeline.py", *fragments)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ deploy configs


@pytest.mark.parametrize("opset, fragment", [(99, "99 > 20"), (21, "21 > 20"), (16, "16 < 17")])
def test_deploy_opset_range_checked_before_calibration(art, tmp_path, opset, fragment, capsys):
    from repq_export.resources import DEFAULT_DEPLOY_CONFIG

    deploy = tmp_path / "deploy.py"
    deploy.write_text(Path(DEFAULT_DEPLOY_CONFIG).read_text().replace("opset_version=17", f"opset_version={opset}"))
    one_error(call_main(cli.main, ["--ckpt", art.ckpt, "--config", TINY_MASK, "--bits", 4, "--calib", art.img_dir,
                                   "--deploy-config", deploy, "--out", tmp_path / "out", "--quiet"], capsys),
              "deploy.py", "onnx_config.opset_version", fragment)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ repq.json read back


def _set(path: str, value):
    def edit(manifest):
        *parents, last = path.split(".")
        entry = manifest
        for key in parents:
            entry = entry[int(key)] if isinstance(entry, list) else entry[key]
        entry[last] = value
    return edit


OV_BACKEND = {"type": "openvino", "device": "CPU", "graph_form": "tensorrt", "inference_precision": "f32",
              "roi_nan_guard": True, "log_sqrt2_lowering": "bisect", "static_shapes": True}
MANIFEST_EDITS = {
    "keep_top_k negative": (_set("post_processing.keep_top_k", -3), "post_processing.keep_top_k"),
    "score threshold a string": (_set("post_processing.score_threshold", "0.05"), "post_processing.score_threshold"),
    "std with a zero": (_set("preprocess.std", [0, 1, 1]), "preprocess.std"),
    "mean of 2 values": (_set("preprocess.mean", [1.0, 2.0]), "preprocess.mean"),
    "size_divisor 0": (_set("preprocess.size_divisor", 0), "preprocess.size_divisor"),
    "onnx file out of the folder": (_set("onnx.file", "../model.onnx"), "onnx.file"),
    "quant_state file absolute": (_set("quant_state.file", "/etc/passwd"), "quant_state.file"),
    "source sha256 not hex": (_set("source_checkpoint.sha256", "zz"), "source_checkpoint.sha256"),
    "w_bits a string": (_set("w_bits", "4"), "w_bits"),
    "w_bits 99": (_set("w_bits", 99), "w_bits"),
    "opset 99": (_set("onnx.opset", 99), "onnx.opset"),
    "no providers": (_set("backend.providers", []), "backend.providers"),
    "unknown optimization level": (_set("backend.graph_optimization_level", "max"), "backend.graph_optimization_level"),
    "openvino static_shapes a string": (_set("backend", {**OV_BACKEND, "static_shapes": "yes"}), "backend.static_shapes"),
    "openvino unknown log-sqrt2 lowering": (_set("backend", {**OV_BACKEND, "log_sqrt2_lowering": "log"}),
                                            "backend.log_sqrt2_lowering"),
    "classes of another length": (_set("classes", ["a"]), "classes"),
    "quantizer bits a string": (_set("quantizers.0.bits", "4"), "quantizers[0].bits"),
    "quantizer scale a string": (_set("quantizers.0.scale", "0.1"), "quantizers[0].scale"),
    "version 2": (_set("version", 2), "version"),
    "preprocess a list": (_set("preprocess", [1]), "preprocess"),
}


@pytest.mark.parametrize("case", list(MANIFEST_EDITS))
def test_edited_manifest_field_is_named(art, tmp_path, case, capsys):
    edit, field = MANIFEST_EDITS[case]
    edited = Path(shutil.copytree(art.path, tmp_path / "edited"))
    manifest = json.loads((edited / "repq.json").read_text())
    edit(manifest)
    (edited / "repq.json").write_text(json.dumps(manifest))
    image = next(art.img_dir.iterdir())
    line = one_error(call_main(cli.main, ["predict", edited, image, "--save", tmp_path / "p.png"], capsys),
                     "repq.json", field)
    assert "Traceback" not in line and not (tmp_path / "p.png").exists()
    # the runners of tools/test.py read the same manifest, checked the same way, before any image
    one_error(call_main(test_tool.main, [TINY_MASK, art.ckpt, "--backend", "ort", "--model", edited, "--ann", art.ann,
                                         "--img-dir", art.img_dir, "--quiet"], capsys), "repq.json", field)


# ------------------------------------------------------------------ the artifact's source checkpoint


def test_artifact_of_another_checkpoint_is_refused(art, tmp_path, capsys):
    other = make_checkpoint(tmp_path / "other.pth", seed=3)
    for model in (art.path, art.path / "model.onnx"):
        one_error(call_main(test_tool.main, [TINY_MASK, other, "--backend", "ort", "--model", model, "--ann", art.ann,
                                             "--img-dir", art.img_dir, "--quiet"], capsys),
                  "another checkpoint", "tiny_mask.pth", "other.pth")
    result = call_main(test_tool.main, [TINY_MASK, art.ckpt, "--backend", "ort", "--model", art.path, "--ann", art.ann,
                                        "--img-dir", art.img_dir, "--max-images", 1, "--quiet"], capsys)
    assert result.rc == 0 and "bbox_mAP" in result.out, result.err


# ------------------------------------------------------------------ check on graphs that pass onnx.checker


def _qdq_graph(path: Path, clip_bounds: int = 1, zp_len: int = 4, loop_trips: int | None = None) -> Path:
    """x -> Q(uint8) -> Clip -> DQ -> MatMul(DQ(int8 weight [3, 4], per-axis 1)) -> y, the onnxruntime form;
    the weight comes from a Loop of `loop_trips` trips when given."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    inits = [numpy_helper.from_array(np.array(0.1, np.float32), "s"), numpy_helper.from_array(np.array(128, np.uint8), "zp"),
             numpy_helper.from_array(np.zeros(clip_bounds, np.uint8) if clip_bounds > 1 else np.array(0, np.uint8), "lo"),
             numpy_helper.from_array(np.full(clip_bounds, 255, np.uint8) if clip_bounds > 1 else np.array(255, np.uint8),
                                     "hi"),
             numpy_helper.from_array(np.full(4, 0.01, np.float32), "ws"),
             numpy_helper.from_array(np.zeros(zp_len, np.int8), "wzp")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["q"]),
             helper.make_node("Clip", ["q", "lo", "hi"], ["c"]),
             helper.make_node("DequantizeLinear", ["c", "s", "zp"], ["d"])]
    weight = np.arange(12, dtype=np.int8).reshape(3, 4)
    if loop_trips is None:
        inits.append(numpy_helper.from_array(weight, "w"))
    else:
        inits += [numpy_helper.from_array(np.array(loop_trips, np.int64), "trips"),
                  numpy_helper.from_array(np.array(True), "cond"), numpy_helper.from_array(weight, "w0")]
        body = helper.make_graph(
            [helper.make_node("Identity", ["cond_in"], ["cond_out"]), helper.make_node("Identity", ["v_in"], ["v_out"])],
            "body", [helper.make_tensor_value_info("i", TensorProto.INT64, []),
                     helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
                     helper.make_tensor_value_info("v_in", TensorProto.INT8, [3, 4])],
            [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
             helper.make_tensor_value_info("v_out", TensorProto.INT8, [3, 4])])
        nodes.append(helper.make_node("Loop", ["trips", "cond", "w0"], ["w"], body=body, name="slow_loop"))
    nodes += [helper.make_node("DequantizeLinear", ["w", "ws", "wzp"], ["wf"], axis=1),
              helper.make_node("MatMul", ["d", "wf"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)  # the point: each passes the checker
    onnx.save(model, path)
    return path


@pytest.mark.parametrize("kwargs, rule, fragment", [
    (dict(clip_bounds=2), "act-chain", "scalar"),
    (dict(zp_len=3), "qdq-shape", "zero point has 3 value(s), the scale 4"),
    (dict(loop_trips=10 ** 12), "weight-path", "Loop"),
])
def test_check_reports_instead_of_crashing_or_hanging(tmp_path, kwargs, rule, fragment):
    path = _qdq_graph(tmp_path / "g.onnx", **kwargs)
    result = run_cli(CLI, "check", path, timeout=120)  # the Loop case never returned before
    assert result.rc == 1 and "Traceback" not in result.err, result.err[-2000:]
    assert f"[{rule}]" in result.out and fragment in result.out, result.out


def test_check_passes_the_plain_graph(tmp_path):
    """The same graph with scalar bounds, a fitting zero point and a constant weight has no issue."""
    result = run_cli(CLI, "check", _qdq_graph(tmp_path / "g.onnx"), timeout=120)
    assert result.rc == 0 and "no issues found" in result.out, result.out + result.err


def test_folding_budget_refuses_a_huge_expand():
    """An Expand to 10^12 elements is refused from its predicted size, before anything is allocated."""
    from onnx import helper

    from repq_export.export.const_eval import FoldRefused, evaluate

    node = helper.make_node("Expand", ["a", "shape"], ["b"])
    constants = {"a": np.zeros((1, 1), np.int8), "shape": np.array([10 ** 6, 10 ** 6], np.int64)}
    with pytest.raises(FoldRefused, match="would make 1000000000000 elements"):
        evaluate([node], constants.get, [helper.make_opsetid("", 17)], "b")
