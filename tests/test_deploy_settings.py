"""Every deploy-config field takes effect in the artifact: file name, post-processing thresholds,
static input size, onnxruntime providers and optimization level (or is refused with one line)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest

from cli_helpers import TINY_MASK, make_checkpoint, make_coco
from repq_export.runtime.build import runner_for
from repq_export.data.images import read_image
from repq_export.data.transforms import preprocess
from repq_export.errors import UserError
from repq_export.artifact.artifact_file import Artifact
from repq_export.artifact.detector import fake_quant_model
from repq_export.export.artifact import ExportRequest, export_artifact

STATIC_W, STATIC_H = 288, 224  # larger than any tiny-config image (scale 256 x 192), multiples of 32

DEPLOY = """
onnx_config = dict(
    opset_version=17,
    save_file='detector.onnx',
    input_names=['img', 'img_hw'],
    output_names=['boxes', 'scores', 'labels', 'masks'],
    input_shape=SHAPE,
    dynamic_axes=dict(IMG_AXESboxes={0: 'num_dets'}, scores={0: 'num_dets'},
                      labels={0: 'num_dets'}, masks={0: 'num_dets'}),
)
codebase_config = dict(post_processing=dict(score_threshold=0.3, iou_threshold=0.3, keep_top_k=3,
                                            mask_thr_binary=0.7))
backend_config = dict(type='onnxruntime', providers=PROVIDERS, graph_optimization_level='basic')
"""


def write_deploy(path: Path, static: bool = False, providers=("CPUExecutionProvider",)) -> Path:
    shape = f"[{STATIC_W}, {STATIC_H}]" if static else "None"
    img_axes = "" if static else "img={2: 'height', 3: 'width'}, "
    path.write_text(DEPLOY.replace("SHAPE", shape).replace("IMG_AXES", img_axes)
                    .replace("PROVIDERS", repr(list(providers))))
    return path


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """One tiny checkpoint, its calibration/test images and a static-size artifact of it."""
    root = tmp_path_factory.mktemp("deploy")
    ckpt = make_checkpoint(root / "tiny.pth")
    ann, img_dir = make_coco(root / "coco", num_images=2)
    deploy = write_deploy(root / "deploy.py", static=True)
    out = export_artifact(ExportRequest(ckpt=ckpt, out=root / "art", w_bits=4, a_bits=4, config=TINY_MASK,
                                        calib_dir=img_dir, deploy_config=deploy, accept_accuracy_loss=True),
                                        progress=False,
                          log=lambda *_: None)
    return root, out, img_dir


def test_save_file_names_the_onnx_file(made):
    _, out, _ = made
    manifest = json.loads((out / "repq.json").read_text())
    assert manifest["onnx"]["file"] == "detector.onnx"
    assert (out / "detector.onnx").is_file() and not (out / "model.onnx").exists()


def test_post_processing_and_static_size_reach_the_graph(made):
    _, out, img_dir = made
    proto = onnx.load(str(out / "detector.onnx"))
    img = proto.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in img] == [1, 3, STATIC_H, STATIC_W]
    boxes = proto.graph.output[0].type.tensor_type.shape.dim
    assert boxes[0].dim_param  # the number of detections stays dynamic in a static export
    artifact = Artifact.open(out)
    settings = artifact.preprocess
    assert settings.pad_to == (STATIC_H, STATIC_W)
    runner = runner_for("ort", artifact)
    qmodel = fake_quant_model(artifact)
    assert qmodel.roi_head.score_thr == 0.3 and qmodel.roi_head.max_per_img == 3
    for path in sorted(img_dir.iterdir()):
        prep = preprocess(read_image(path), **vars(settings))
        assert prep.pad_hw == (STATIC_H, STATIC_W)
        boxes, scores, labels, masks = runner(prep.tensor, prep.img_hw_tensor)
        scores = np.asarray(scores)
        assert len(scores) <= 3 and (scores > 0.3).all()


def test_session_settings_travel_with_the_artifact(made):
    _, out, _ = made
    import onnxruntime as ort

    runner = runner_for("ort", Artifact.open(out))
    level = runner.session.get_session_options().graph_optimization_level
    assert level == ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    assert runner.session.get_providers() == ["CPUExecutionProvider"]
    manifest = json.loads((out / "repq.json").read_text())
    assert manifest["backend"] == {"type": "onnxruntime", "providers": ["CPUExecutionProvider"],
                                   "graph_optimization_level": "basic", "target_cpu": "any"}


def test_a_provider_this_onnxruntime_lacks_is_refused(made):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    _, out, _ = made
    manifest_path = out / "repq.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["backend"]["providers"] = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    edited = out.parent / "cuda_art"
    edited.mkdir()
    for f in out.iterdir():
        (edited / f.name).write_bytes(f.read_bytes())
    (edited / "repq.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="lacks CUDAExecutionProvider"):
        runner_for("ort", Artifact.open(edited))


def test_an_image_larger_than_the_static_size_is_refused(made):
    _, out, _ = made
    settings = Artifact.open(out).preprocess
    big = np.zeros((800, 1200, 3), np.uint8)  # resized to 171 x 256 (h x w) at the tiny scale
    with pytest.raises(UserError, match="does not fit the graph's static input size"):
        preprocess(big, **vars(replace(settings, pad_to=(160, 160))))


@pytest.mark.parametrize("name", ["../x.onnx", "sub/x.onnx", "x.pb", ".onnx"])
def test_save_file_must_be_a_plain_onnx_name(tmp_path, name):
    from repq_export.deploy_config import load_deploy_config

    path = write_deploy(tmp_path / "d.py")
    path.write_text(path.read_text().replace("'detector.onnx'", repr(name)))
    with pytest.raises(UserError, match="save_file: must be a plain file name ending in .onnx"):
        load_deploy_config(path)
