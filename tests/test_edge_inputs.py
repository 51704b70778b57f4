"""The deployed graph runs wherever the float graph runs (issue 23, item 1).

Edge images made here (black, white, 8x8, portrait, landscape, the thinnest strips and the largest
input the tiny test pipeline admits) go through every form of the tiny detectors on onnxruntime:
the onnxruntime form at 4 bits (im2col, integer MatMuls) and at 8 bits for target CPU 'any'
(split weights) and 'vnni' (widened weights), the TensorRT form, and the TensorRT form exported
with the static deploy config (at a small static size by default; its own 800x1344 is slow).
Three post-processing settings bound the RoIs the mask head gets: none (score threshold 1.0: no
image gives a detection), exactly one (keep_top_k 1) and the maximum
(keep_top_k 100, which the confident tiny detectors fill on every image). Each deployed graph must
give the float graph's output shapes on every image, and tier 1 (every quantizer's codes against
fake quant, on the graph's own inputs) 0 differing codes where there are codes.

The rest of the W2..W8 matrix, the Cascade detector and the onnxruntime form at a static shape are
marked slow (`pytest -m slow`).
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from repq_export.config_source import load_config
from repq_export.deploy_config import TARGET_ANY, TARGET_VNNI, PostProcessing, load_deploy_config
from repq_export.data.transforms import PreprocessSettings, preprocess
from repq_export.evaluation.parity import compare_codes, find_code_probes, with_probe_outputs
from repq_export.artifact.artifact_file import Artifact
from repq_export.artifact.detector import apply_post_processing
from repq_export.export.forms import ONNXRUNTIME, TENSORRT
from repq_export.graph_targets import graph_target_cpu
from repq_export.export.graph_index import index_graph
from repq_export.export.onnx_export import count_qdq, export_onnx
from repq_export.export.ort_check import check_onnxruntime_form, rule_empty_reshape
from repq_export.models.test_pipeline import preprocess_settings
from repq_export.quant.calibrate import quantize
from repq_export.quant.layers import named_quantizers
from repq_export.resources import DEPLOY_CONFIGS_DIR
from repq_export.runtime.cpu_features import saturation_free
from repq_export.runtime.ort_runner import OrtRunner

from test_export import CONFIGS, IMG_HW, tiny_float_model

STATIC_DEPLOY = DEPLOY_CONFIGS_DIR / "instance-seg_tensorrt-int8_static-800x1344.py"
#: the static deploy config's own size, and a small one that holds every tiny-pipeline image (at most
#: 256 on a side): the default case uses the small one (the same static code path, a fifth of the time)
DEPLOY_STATIC, SMALL_STATIC = (800, 1344), (256, 320)

#: post-processing settings and the detections (= mask-head RoIs) each gives on every image
REGIMES = {"none": (PostProcessing(score_threshold=1.0), 0), "one": (PostProcessing(keep_top_k=1), 1),
           "max": (PostProcessing(), PostProcessing().keep_top_k)}


@dataclasses.dataclass(frozen=True)
class Form:
    """One deployed graph: detector kind, bit width, form, target CPU, static input size (h, w) or
    None (dynamic)."""

    kind: str
    bits: int
    form: str
    target: str = TARGET_ANY
    static: tuple[int, int] | None = None

    @property
    def id(self) -> str:
        """A short test id, e.g. mask-w8-ort-vnni."""
        name = "ort" if self.form == ONNXRUNTIME else "trt"
        return f"{self.kind}-w{self.bits}-{name}" + (self.target == TARGET_VNNI) * "-vnni" + (
            f"-static{self.static[0]}x{self.static[1]}" if self.static else "")


# The default cases cover every rewrite code path with 0 RoIs in the mask head: im2col + integer
# MatMul (4-bit), split (8-bit 'any', where every stride-1 conv is im2col), widen (8-bit 'vnni'),
# the TensorRT form and a static input shape; and 1 and keep_top_k RoIs on the 8-bit graphs. Each
# case is one export (most of its time), so the rest of the W2..W8 matrix is slow.
DEFAULT_CASES = [(Form("mask", 4, ONNXRUNTIME), "none"), (Form("mask", 8, ONNXRUNTIME), "none"),
                 (Form("mask", 8, ONNXRUNTIME, TARGET_VNNI), "none"), (Form("mask", 4, TENSORRT), "none"),
                 (Form("mask", 4, TENSORRT, static=SMALL_STATIC), "none"), (Form("mask", 8, ONNXRUNTIME), "one"),
                 (Form("mask", 8, ONNXRUNTIME, TARGET_VNNI), "max")]
ALL_FORMS = ([Form(kind, b, ONNXRUNTIME) for kind in ("mask", "cascade") for b in range(2, 9)]
             + [Form(kind, 8, ONNXRUNTIME, TARGET_VNNI) for kind in ("mask", "cascade")]
             + [Form(kind, b, TENSORRT) for kind in ("mask", "cascade") for b in range(2, 8)]
             + [Form("mask", 4, TENSORRT, static=DEPLOY_STATIC), Form("mask", 4, ONNXRUNTIME, static=DEPLOY_STATIC),
                Form("mask", 8, ONNXRUNTIME, static=DEPLOY_STATIC)])
CASES = [pytest.param(f, r, id=f"{f.id}-{r}") for f, r in DEFAULT_CASES] + [
    pytest.param(f, r, id=f"{f.id}-{r}", marks=pytest.mark.slow)
    for f in ALL_FORMS for r in REGIMES if (f, r) not in DEFAULT_CASES]
#: a static graph pads every image to the same input size: two contents are enough there
STATIC_IMAGES = ("black", "largest")


def edge_images() -> dict[str, np.ndarray]:
    """BGR uint8 images at the edges of the tiny pipeline (scale 256x192, pad to 32): flat colours
    that the issue's detectors found nothing in, an 8x8 image, both orientations, the thinnest
    strips it admits (1 pixel: a 32x256 network input, the smallest) and a large photo-sized one
    (resized to 192x256, the largest input)."""
    rng = np.random.default_rng(23)

    def noise(h: int, w: int) -> np.ndarray:
        return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)

    return {"black": np.zeros((400, 600, 3), np.uint8), "white": np.full((400, 600, 3), 255, np.uint8),
            "8x8": noise(8, 8), "portrait": noise(600, 300), "landscape": noise(300, 600),
            "row": noise(1, 400), "column": noise(400, 1), "largest": noise(1536, 2048)}


def network_inputs(kind: str, static: tuple[int, int] | None = None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Each edge image as the network gets it: (img, img_hw), padded to `static` (h, w) if given
    (then only STATIC_IMAGES)."""
    settings: PreprocessSettings = preprocess_settings(load_config(CONFIGS[kind]))
    settings = dataclasses.replace(settings, pad_to=static)
    prepared = {name: preprocess(img, **vars(settings)) for name, img in edge_images().items()
                if static is None or name in STATIC_IMAGES}
    return {name: (p.tensor, p.img_hw_tensor) for name, p in prepared.items()}


def with_post_processing(model: torch.nn.Module, regime: str) -> torch.nn.Module:
    """A copy of `model` whose graph carries the regime's post-processing."""
    copied = copy.deepcopy(model)
    apply_post_processing(copied, REGIMES[regime][0])
    return copied


def output_shapes(path: Path, inputs: dict) -> dict[str, list[tuple[int, ...]]]:
    """The four output shapes of the graph at `path`, run by the project's runner, per edge image."""
    runner = OrtRunner(path)
    return {name: [tuple(o.shape) for o in runner(img, img_hw)] for name, (img, img_hw) in inputs.items()}


def tier1(qmodel: torch.nn.Module, proto: onnx.ModelProto, inputs: dict) -> dict[str, tuple[int, int]]:
    """(codes compared, codes that differ) of every quantizer call, per edge image, onnxruntime at its
    default level (the level the runners use)."""
    probes = find_code_probes(proto, {n for n, _ in named_quantizers(qmodel)})
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(with_probe_outputs(proto, probes).SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    result = {}
    for image, (img, img_hw) in inputs.items():
        values = dict(zip(names, sess.run(None, {"img": img.numpy(), "img_hw": img_hw.numpy()})))
        reports: dict = {}
        compare_codes(qmodel, probes, values, reports)
        result[image] = (sum(r.elements for r in reports.values()), sum(r.mismatches for r in reports.values()))
    return result


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def calibrated():
    """calibrated(kind, bits) -> the fake-quant tiny detector, calibrated once per module."""
    cache: dict[tuple[str, int], torch.nn.Module] = {}

    def get(kind: str, bits: int) -> torch.nn.Module:
        if (kind, bits) not in cache:
            torch.manual_seed(0)
            img = torch.randn(1, 3, 160, 224)
            cache[(kind, bits)] = quantize(tiny_float_model(kind), [(img, IMG_HW)], bits, bits, progress=False)
        return cache[(kind, bits)]
    return get


@pytest.fixture(scope="module")
def float_shapes(tmp_path_factory):
    """float_shapes(kind, regime, static) -> the float graph's output shapes per edge image (the
    dynamic float graph, fed the same padded inputs as the deployed one)."""
    cache: dict = {}
    graphs: dict = {}

    def get(kind: str, regime: str, static: tuple[int, int] | None) -> dict:
        if (kind, regime) not in graphs:
            path = tmp_path_factory.mktemp(f"float-{kind}-{regime}") / "model.onnx"
            torch.manual_seed(0)
            export_onnx(with_post_processing(tiny_float_model(kind), regime), path, torch.randn(1, 3, 160, 224), IMG_HW,
                        form=TENSORRT)
            graphs[(kind, regime)] = path
        if (kind, regime, static) not in cache:
            cache[(kind, regime, static)] = output_shapes(graphs[(kind, regime)], network_inputs(kind, static))
        return cache[(kind, regime, static)]
    return get


def export_form(qmodel: torch.nn.Module, form: Form, path: Path) -> tuple[onnx.ModelProto, tuple[int, int] | None]:
    """Export `qmodel` in `form`; returns the graph and its static input size (h, w) or None."""
    cfg, static = None, form.static
    if static:
        cfg = load_deploy_config(STATIC_DEPLOY).onnx
        assert cfg.input_shape == DEPLOY_STATIC[::-1]
        cfg = dataclasses.replace(cfg, input_shape=static[::-1])  # (width, height), as the config has it
    img, img_hw = network_inputs(form.kind, static)["largest"]
    proto = export_onnx(qmodel, path, img, img_hw, cfg=cfg, form=form.form, target_cpu=form.target)
    return proto, static


# ----------------------------------------------------------------------------- the matrix


@pytest.mark.parametrize("form, regime", CASES)
def test_deployed_graph_runs_every_edge_image_like_the_float_graph(form, regime, calibrated, float_shapes,
                                                                    tmp_path):
    """Output shapes equal the float graph's (0, 1 or keep_top_k detections on every image), and
    tier 1 finds 0 differing codes among the codes of every quantizer call."""
    qmodel = with_post_processing(calibrated(form.kind, form.bits), regime)
    proto, static = export_form(qmodel, form, tmp_path / "model.onnx")
    if form.form == ONNXRUNTIME:
        assert check_onnxruntime_form(proto) == []  # the empty-reshape rule included
    assert rule_empty_reshape(index_graph(proto)) == []
    if static:
        dims = [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
        assert dims == [1, 3, *static]
    if graph_target_cpu(proto) == TARGET_VNNI:
        weights = sum(1 for n, _ in named_quantizers(qmodel) if n.endswith("weight_quantizer"))
        assert (count_qdq(proto)["int8_weights"], count_qdq(proto)["uint8_weights"]) == (weights, 0)
        if not saturation_free():
            pytest.skip("target CPU 'vnni' graph (structure checked): this CPU has no VNNI/AMX to run it")
    inputs = network_inputs(form.kind, static)
    want = float_shapes(form.kind, regime, static)
    got = output_shapes(tmp_path / "model.onnx", inputs)
    detections = REGIMES[regime][1]
    for image in inputs:
        assert got[image] == want[image], image
        assert got[image][0] == (detections, 4) and got[image][3] == (detections, 28, 28), image
    for image, (elements, differ) in tier1(qmodel, proto, inputs).items():
        assert elements > 10_000 and differ == 0, (image, elements, differ)


def test_the_largest_edge_image_fills_the_box_heads_rois():
    """The RPN gives its maximum of proposals (max_proposals, 1000) on the largest input, so the
    matrix runs the box head at its largest RoI batch too; the thinnest strip gives far fewer."""
    model = tiny_float_model("mask").eval()
    inputs = network_inputs("mask")
    with torch.no_grad():
        counts = {name: len(model.rpn_head(model.extract_feat(inputs[name][0]), inputs[name][1])[0])
                  for name in ("largest", "row")}
    assert counts["largest"] == model.rpn_head.max_proposals == 1000 and counts["row"] < 1000


# ----------------------------------------------------------------------------- command line and serving


#: flat images, in which the silent artifact below finds nothing
FLAT_IMAGES = {"black": np.zeros((400, 600, 3), np.uint8), "white": np.full((400, 600, 3), 255, np.uint8),
               "8x8": np.zeros((8, 8, 3), np.uint8), "row": np.zeros((1, 400, 3), np.uint8),
               "column": np.zeros((400, 1, 3), np.uint8)}


@pytest.fixture(scope="module")
def silent_artifact(tmp_path_factory) -> Path:
    """A tiny W8A8 artifact (onnxruntime form, split 8-bit weights: every stride-1 conv is im2col)
    whose deploy config keeps detections scoring above 0.9: it finds some on its calibration image
    (0.98) and none in a flat image (the float model's best there: 0.78 black, 0.64 white), so
    the mask head gets 0 RoIs there, as an empty scene gives a trained detector."""
    from cli_helpers import TINY_MASK, make_checkpoint, make_coco
    from repq_export.export.artifact import ExportRequest, export_artifact

    root = tmp_path_factory.mktemp("silent")
    text = (DEPLOY_CONFIGS_DIR / "instance-seg_onnxruntime_cpu.py").read_text()
    assert "score_threshold=0.05" in text
    (root / "deploy.py").write_text(text.replace("score_threshold=0.05", "score_threshold=0.9"))
    _, img_dir = make_coco(root / "coco", num_images=1)
    request = ExportRequest(ckpt=make_checkpoint(root / "tiny.pth"), out=root / "artifact", w_bits=8, a_bits=8,
                            config=TINY_MASK, calib_dir=img_dir, deploy_config=root / "deploy.py")
    export_artifact(request, progress=False, log=lambda *_: None)
    return root / "artifact"


def write_png(path: Path, name: str) -> Path:
    """Flat image `name` as a PNG file."""
    import cv2

    assert cv2.imwrite(str(path), FLAT_IMAGES[name])
    return path


def test_predict_says_there_are_no_detections_on_a_black_image(silent_artifact, tmp_path):
    """`repq-export predict ARTIFACT black.png` exits 0, says 0 detections and draws the picture."""
    import cv2
    from cli_helpers import CLI, run_cli

    black = write_png(tmp_path / "black.png", "black")
    result = run_cli(CLI, "predict", silent_artifact, black, "--save", tmp_path / "pred.png")
    assert result.rc == 0 and "Traceback" not in result.err, result.err[-3000:]
    assert "0 detections with score >= 0.3 (0 in all)" in result.out
    assert cv2.imread(str(tmp_path / "pred.png")).shape == (400, 600, 3)


@pytest.mark.parametrize("name", ["white", "8x8", "row"])
def test_predict_on_other_empty_images(silent_artifact, name, tmp_path, capsys):
    """The same in-process for a white, an 8x8 and a 1-pixel-high image."""
    from cli_helpers import call_main
    from repq_export.cli import main as cli_main

    image = write_png(tmp_path / f"{name}.png", name)
    result = call_main(cli_main, ["predict", silent_artifact, image, "--save", tmp_path / "pred.png"], capsys)
    assert result.rc == 0 and "(0 in all)" in result.out, result.err


def test_tools_test_scores_a_set_with_an_image_without_detections(silent_artifact, tmp_path, capsys):
    """`tools/test.py CFG CKPT --backend ort --model ARTIFACT` over the calibration image and a black
    one (no detection there): it runs to the end, exit 0, and writes its metrics."""
    import json
    import shutil

    from cli_helpers import TINY_MASK, call_main
    from repq_export.commands import test_tool

    root = silent_artifact.parent
    coco = json.loads((root / "coco/annotations/instances_val.json").read_text())
    img_dir = tmp_path / "images"
    shutil.copytree(root / "coco/val", img_dir)
    write_png(img_dir / "black.png", "black")
    coco["images"].append({"id": max(i["id"] for i in coco["images"]) + 1, "file_name": "black.png",
                           "height": 400, "width": 600})
    (tmp_path / "ann.json").write_text(json.dumps(coco))
    argv = [TINY_MASK, root / "tiny.pth", "--eval", "bbox", "segm", "--backend", "ort", "--model", silent_artifact,
            "--ann", tmp_path / "ann.json", "--img-dir", img_dir, "--quiet", "--json-out", tmp_path / "metrics.json"]
    result = call_main(test_tool.main, argv, capsys)
    assert result.rc == 0 and "Traceback" not in result.err, result.err[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert {"bbox_mAP", "segm_mAP"} <= set(metrics), metrics


def test_serving_returns_an_empty_detection_list(silent_artifact):
    """The server's request function and the Triton repository's steps around the network answer
    an image without detections with an empty list, in the image's own size."""
    import cv2
    from repq_export.serving import codec
    from repq_export.serving.server import ServeOptions, model_instances
    from repq_export.serving.triton_stages import run_postprocess, run_preprocess

    opened = Artifact.open(silent_artifact)
    models, manifest = model_instances(opened, ServeOptions()), opened.manifest
    for name, image in FLAT_IMAGES.items():
        data = cv2.imencode(".png", image)[1].reshape(1, -1)
        served = [codec.decode_response(models[0].detect({codec.IMAGE: data}))]
        pre = run_preprocess(data, manifest["preprocess"])
        net = models[0].runner(torch.from_numpy(pre["img"]), torch.from_numpy(pre["img_hw"]))
        served.append(codec.decode_response(run_postprocess({**{k: v.numpy() for k, v in net._asdict().items()},
                                                             **pre}, manifest["classes"])))
        for answer in served:
            assert (len(answer), answer.boxes.shape, answer.masks) == (0, (0, 4), []), name
            assert answer.image_size == image.shape[:2], name


def test_serving_refuses_an_image_that_shrinks_to_nothing_as_a_bad_request(silent_artifact):
    """A 1x2000 image has no pixel row left at the tiny scale: a BadRequest (the server keeps
    serving), from both serving paths, not an error from inside the model."""
    import cv2
    from repq_export.serving import codec
    from repq_export.serving.server import ServeOptions, model_instances
    from repq_export.serving.triton_stages import run_preprocess

    opened = Artifact.open(silent_artifact)
    models, manifest = model_instances(opened, ServeOptions()), opened.manifest
    data = cv2.imencode(".png", np.zeros((1, 2000, 3), np.uint8))[1].reshape(1, -1)
    with pytest.raises(codec.BadRequest, match="shrinks to nothing"):
        models[0].detect({codec.IMAGE: data})
    with pytest.raises(codec.BadRequest, match="shrinks to nothing"):
        run_preprocess(data, manifest["preprocess"])


def test_triton_preprocessing_pads_to_a_static_graphs_size():
    """The Triton repository's preprocessing step pads to the static input size a static artifact
    records (pad_to), as predict and the server do, and refuses an image that does not fit."""
    from repq_export.serving import codec
    from repq_export.serving.triton_stages import run_preprocess
    import cv2

    settings = dataclasses.replace(preprocess_settings(load_config(CONFIGS["mask"])), pad_to=(256, 288))
    data = cv2.imencode(".png", edge_images()["landscape"])[1].reshape(1, -1)
    pre = run_preprocess(data, settings.as_dict())
    assert pre["img"].shape == (1, 3, 256, 288) and pre["img_hw"].tolist() == [128, 256]
    small = dataclasses.replace(settings, pad_to=(64, 64)).as_dict()
    with pytest.raises(codec.BadRequest, match="static input size"):
        run_preprocess(data, small)


@pytest.mark.parametrize("config,bits", [("instance-seg_openvino_cpu.py", 4), ("instance-seg_openvino_cpu.py", 8)])
@pytest.mark.parametrize("regime", ["none", "one"])
def test_the_openvino_deploy_form_runs_every_edge_image_like_the_float_graph(regime, config, bits, calibrated,
                                                                             float_shapes, tmp_path):
    """Each OpenVINO deploy config's graph, exported and compiled as the config says (its form, the
    RoiAlign NaN guard, the bisected log-sqrt2 quantizer, unshared weight codes, static shapes), run by
    OpenVINO: 0 or 1 detections on every edge image, the float graph's output shapes, no NaN."""
    from repq_export.export.forms import (form_for, log_sqrt2_lowering_for, roi_nan_guard_for,
                                          unshared_weights_for)
    from repq_export.runtime.openvino_runner import OpenVINORunner, openvino_available

    ok, why = openvino_available()
    if not ok:
        pytest.skip(why)
    deploy = load_deploy_config(DEPLOY_CONFIGS_DIR / config)
    qmodel = with_post_processing(calibrated("mask", bits), regime)
    inputs = network_inputs("mask")
    img, img_hw = inputs["largest"]
    export_onnx(qmodel, tmp_path / "model.onnx", img, img_hw, form=form_for(deploy),
                roi_nan_guard=roi_nan_guard_for(deploy), log_sqrt2=log_sqrt2_lowering_for(deploy),
                unshared_weights=unshared_weights_for(deploy))
    runner = OpenVINORunner(tmp_path / "model.onnx", threads=1, static_shapes=deploy.backend.static_shapes)
    want, detections = float_shapes("mask", regime, None), REGIMES[regime][1]
    for name, (img, img_hw) in inputs.items():
        out = runner(img, img_hw)
        assert [tuple(o.shape) for o in out] == want[name], name
        assert out.boxes.shape == (detections, 4) and not torch.isnan(out.masks).any(), name
