"""TensorRT engine build and runner.

Tests marked ``tensorrt`` need the tensorrt package and a CUDA GPU and skip elsewhere, with
the reason ``tensorrt_available()`` gives. The unmarked tests check, on any machine, what
must hold without TensorRT: imports work, errors are one clear UserError line, and the tiny
detector-shaped fixture graph is valid (onnxruntime runs it, trt_check finds no error).
"""

import dataclasses
import enum
import importlib
import sys
import types
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from repq_export.deploy_config import load_deploy_config
from repq_export.errors import UserError
from repq_export.export import tensorrt_builder
from repq_export.export.tensorrt_builder import build_engine, tensorrt_available
from repq_export.export.trt_check import check_tensorrt_compat, format_report
from repq_export.runtime import trt_runner
from repq_export.runtime.trt_runner import TensorRTRunner

CONFIGS = Path(__file__).resolve().parents[1] / "deploy_configs"
STRIDE = 8
TRT_DEPLOY = """
onnx_config = dict(opset_version=17, dynamic_axes=dict(img={2: 'height', 3: 'width'}))
backend_config = dict(
    type='tensorrt',
    common_config=dict(fp16_mode=False, max_workspace_size=1 << 28),
    model_inputs=[dict(input_shapes=dict(
        img=dict(min_shape=[1, 3, 32, 32], opt_shape=[1, 3, 64, 96], max_shape=[1, 3, 128, 128]),
        img_hw=dict(min_shape=[2], opt_shape=[2], max_shape=[2])))])
"""


def tiny_detector_onnx():
    """A detector-shaped QDQ graph: img -> Q/DQ -> Conv(int8 per-channel weights, stride 8) gives
    per-cell boxes and scores -> NonMaxSuppression (data-dependent N) -> boxes clipped to img_hw,
    scores, labels and 28x28 'masks'."""
    rng = np.random.default_rng(0)
    inits = {
        "act_scale": np.float32(0.05), "act_zp": np.int8(0),
        "w_q": rng.integers(-7, 8, (5, 3, STRIDE, STRIDE)).astype(np.int8),
        "w_scale": rng.uniform(0.002, 0.004, 5).astype(np.float32), "w_zp": np.zeros(5, np.int8),
        "bias": np.array([0, 0, 0, 0, 0.2], np.float32), "cells": np.array([1, -1, 5], np.int64),
        "s0": np.array([0], np.int64), "s4": np.array([4], np.int64), "s5": np.array([5], np.int64),
        "ax2": np.array([2], np.int64), "ax0": np.array([0], np.int64), "flat": np.array([-1], np.int64),
        "extent": np.float32(64.0), "nms_max": np.array([50], np.int64),
        "iou": np.array([0.5], np.float32), "score_thr": np.array([0.65], np.float32),
        "i1": np.array(1, np.int64), "i2": np.array(2, np.int64), "whwh": np.array([1, 0, 1, 0], np.int64),
        "mask_axes": np.array([1, 2], np.int64), "ones": np.ones((28, 28), np.float32),
    }
    node = helper.make_node
    nodes = [
        node("QuantizeLinear", ["img", "act_scale", "act_zp"], ["img_q"], name="img_q"),
        node("DequantizeLinear", ["img_q", "act_scale", "act_zp"], ["img_dq"], name="img_dq"),
        node("DequantizeLinear", ["w_q", "w_scale", "w_zp"], ["w"], name="w_dq", axis=0),
        node("Conv", ["img_dq", "w", "bias"], ["feat"], name="conv", kernel_shape=[STRIDE, STRIDE],
             strides=[STRIDE, STRIDE]),
        node("Transpose", ["feat"], ["feat_t"], name="nhwc", perm=[0, 2, 3, 1]),
        node("Reshape", ["feat_t", "cells"], ["per_cell"], name="per_cell"),
        node("Slice", ["per_cell", "s0", "s4", "ax2"], ["box_logits"], name="box_logits"),
        node("Sigmoid", ["box_logits"], ["box_unit"], name="box_unit"),
        node("Mul", ["box_unit", "extent"], ["boxes_all"], name="boxes_all"),
        node("Slice", ["per_cell", "s4", "s5", "ax2"], ["score_logit"], name="score_logit"),
        node("Sigmoid", ["score_logit"], ["score_col"], name="score_col"),
        node("Transpose", ["score_col"], ["scores_all"], name="scores_all", perm=[0, 2, 1]),
        node("NonMaxSuppression", ["boxes_all", "scores_all", "nms_max", "iou", "score_thr"], ["keep"],
             name="nms"),
        node("Gather", ["keep", "i2"], ["idx"], name="idx", axis=1),
        node("Gather", ["keep", "i1"], ["labels"], name="labels", axis=1),
        node("Squeeze", ["boxes_all", "ax0"], ["boxes_2d"], name="boxes_2d"),
        node("Gather", ["boxes_2d", "idx"], ["boxes_sel"], name="boxes_sel", axis=0),
        node("Gather", ["img_hw", "whwh"], ["limit"], name="limit", axis=0),
        node("Min", ["boxes_sel", "limit"], ["boxes"], name="clip"),
        node("Reshape", ["scores_all", "flat"], ["scores_1d"], name="scores_1d"),
        node("Gather", ["scores_1d", "idx"], ["scores"], name="scores", axis=0),
        node("Unsqueeze", ["scores", "mask_axes"], ["scores_3d"], name="scores_3d"),
        node("Mul", ["scores_3d", "ones"], ["masks"], name="masks"),
    ]
    graph = helper.make_graph(
        nodes, "tiny_detector",
        [helper.make_tensor_value_info("img", TensorProto.FLOAT, [1, 3, "height", "width"]),
         helper.make_tensor_value_info("img_hw", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("boxes", TensorProto.FLOAT, ["n", 4]),
         helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["n"]),
         helper.make_tensor_value_info("labels", TensorProto.INT64, ["n"]),
         helper.make_tensor_value_info("masks", TensorProto.FLOAT, ["n", 28, 28])],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.fixture
def tiny_onnx(tmp_path):
    path = tmp_path / "tiny.onnx"
    onnx.save(tiny_detector_onnx(), path)
    return path


@pytest.fixture
def trt_deploy(tmp_path):
    path = tmp_path / "tiny_tensorrt.py"
    path.write_text(TRT_DEPLOY)
    return load_deploy_config(path)


def run_ort(onnx_path, img, img_hw):
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    return session.run(["boxes", "scores", "labels", "masks"], {"img": img, "img_hw": img_hw})


def example(h, w, seed):
    img = np.random.default_rng(seed).standard_normal((1, 3, h, w)).astype(np.float32) * 2
    return img, np.array([h - 5, w - 7], np.float32)


def by_score(outputs):
    """Outputs reordered by descending score: NMS leaves the order to the backend."""
    boxes, scores, labels, masks = (np.asarray(o) for o in outputs)
    order = np.argsort(-scores, kind="stable")
    return boxes[order], scores[order], labels[order], masks[order]


# ------------------------------------------------------------------ without TensorRT


@pytest.fixture
def no_tensorrt(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # makes `import tensorrt` raise ImportError


def test_tensorrt_available_says_why_not(no_tensorrt):
    available, why = tensorrt_available()
    assert available is False
    assert why.startswith("the tensorrt Python package cannot be imported")


def test_modules_import_without_tensorrt(no_tensorrt):
    importlib.reload(tensorrt_builder)
    importlib.reload(trt_runner)
    assert callable(trt_runner.TensorRTRunner) and callable(tensorrt_builder.build_engine)


def test_build_engine_refuses_an_onnxruntime_config(tiny_onnx, tmp_path):
    cfg = load_deploy_config(CONFIGS / "instance-seg_onnxruntime_cpu.py")
    with pytest.raises(UserError, match=r"backend_config.type: is 'onnxruntime'.*type='tensorrt'"):
        build_engine(tiny_onnx, tmp_path / "x.engine", cfg)


def test_build_engine_missing_onnx(trt_deploy, tmp_path):
    with pytest.raises(UserError, match="missing.onnx: no such ONNX file"):
        build_engine(tmp_path / "missing.onnx", tmp_path / "x.engine", trt_deploy)


def test_build_engine_without_tensorrt_is_one_line_and_writes_nothing(no_tensorrt, tiny_onnx,
                                                                      trt_deploy, tmp_path):
    engine = tmp_path / "x.engine"
    with pytest.raises(UserError, match="cannot build a TensorRT engine: the tensorrt Python package") as err:
        build_engine(tiny_onnx, engine, trt_deploy)
    assert "\n" not in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.onnx", "tiny_tensorrt.py"]


def test_runner_without_tensorrt(no_tensorrt, tmp_path):
    with pytest.raises(UserError, match="x.engine: cannot run a TensorRT engine"):
        TensorRTRunner(tmp_path / "x.engine")


def test_fixture_graph_runs_in_onnxruntime_and_passes_trt_check(tiny_onnx):
    model = onnx.load(tiny_onnx)
    issues = check_tensorrt_compat(model)
    assert issues == [], format_report(issues)
    img, img_hw = example(64, 96, seed=1)
    boxes, scores, labels, masks = run_ort(tiny_onnx, img, img_hw)
    n = len(scores)
    assert 0 < n <= 20  # some of the 8 x 12 cells pass the 0.5 score threshold
    assert boxes.shape == (n, 4) and labels.dtype == np.int64 and masks.shape == (n, 28, 28)
    assert np.all(scores > 0.5) and np.all(boxes <= img_hw[[1, 0, 1, 0]])
    np.testing.assert_allclose(masks[:, 5, 7], scores)


# ------------------------------------------- the builder's control flow, on a stand-in module


def fake_tensorrt(version="10.99-fake", has_precision_flags=True, parser_errors=()):
    """A stand-in for the tensorrt module that records what build_engine asks of it: the ONNX
    graph's inputs and Q/DQ nodes become the network, and the engine is a fixed byte string."""
    calls = {"flags": set(), "profile": {}, "workspace": None, "cache_in": None}
    fake = types.ModuleType("tensorrt")
    fake.__version__ = version

    class ILogger:
        Severity = enum.IntEnum("Severity", "INTERNAL_ERROR ERROR WARNING INFO VERBOSE", start=0)

        def __init__(self):
            pass

    class Tensor:
        def __init__(self, info):
            self.name = info.name
            self.shape = [d.dim_value if d.HasField("dim_value") else -1 for d in info.type.tensor_type.shape.dim]

    class Layer:
        def __init__(self, node):
            self.type = {"QuantizeLinear": "Q", "DequantizeLinear": "DQ"}.get(node.op_type, node.op_type)

    class Network:
        inputs, layers = [], []
        num_inputs = property(lambda self: len(self.inputs))
        num_layers = property(lambda self: len(self.layers))
        get_input = lambda self, i: self.inputs[i]
        get_layer = lambda self, i: self.layers[i]

    class ParserError:
        def __init__(self, name, op, text):
            self.node_name, self.node_operator, self.desc = (lambda: name), (lambda: op), (lambda: text)

    class OnnxParser:
        def __init__(self, network, logger):
            self.network, self.errors = network, [ParserError(*e) for e in parser_errors]
            self.num_errors = len(self.errors)

        def parse_from_file(self, path):
            graph = onnx.load(path).graph
            self.network.inputs = [Tensor(i) for i in graph.input]
            self.network.layers = [Layer(n) for n in graph.node]
            return not self.errors

        def get_error(self, i):
            return self.errors[i]

    class Profile:
        def set_shape(self, name, low, opt, high):
            calls["profile"][name] = (tuple(low), tuple(opt), tuple(high))

    class Cache:
        serialize = lambda self: b"timings"

    class Config:
        def set_memory_pool_limit(self, pool, size):
            calls["workspace"] = size

        def set_flag(self, flag):
            calls["flags"].add(flag)

        add_optimization_profile = lambda self, profile: 0
        get_timing_cache = lambda self: Cache()
        set_timing_cache = lambda self, cache, ignore_mismatch: True

        def create_timing_cache(self, data):
            calls["cache_in"] = bytes(data)
            return Cache()

    class Builder:
        def __init__(self, logger):
            pass

        create_network = lambda self, flags: Network()
        create_builder_config = lambda self: Config()
        create_optimization_profile = lambda self: Profile()
        build_serialized_network = lambda self, network, config: memoryview(b"ENGINE")

    fake.ILogger, fake.OnnxParser, fake.Builder = ILogger, OnnxParser, Builder
    fake.init_libnvinfer_plugins = lambda logger, namespace: True
    fake.MemoryPoolType = types.SimpleNamespace(WORKSPACE="workspace")
    fake.LayerType = types.SimpleNamespace(QUANTIZE="Q", DEQUANTIZE="DQ")
    fake.BuilderFlag = types.SimpleNamespace(**({"FP16": "fp16", "INT8": "int8"} if has_precision_flags else {}))
    return fake, calls


@pytest.fixture
def use_fake(monkeypatch):
    def install(**kwargs):
        fake, calls = fake_tensorrt(**kwargs)
        monkeypatch.setitem(sys.modules, "tensorrt", fake)
        monkeypatch.setattr(tensorrt_builder, "tensorrt_available", lambda: (True, "fake"))
        return calls
    return install


def test_build_flow_profile_flags_cache_and_atomic_write(use_fake, tiny_onnx, trt_deploy, tmp_path):
    calls = use_fake()
    (tmp_path / "timing.cache").write_bytes(b"old timings")
    messages = []
    engine = build_engine(tiny_onnx, tmp_path / "out" / "tiny.engine", trt_deploy,
                          timing_cache=tmp_path / "timing.cache", log=messages.append)
    assert engine.read_bytes() == b"ENGINE" and (tmp_path / "timing.cache").read_bytes() == b"timings"
    assert calls["cache_in"] == b"old timings" and calls["workspace"] == 1 << 28
    assert calls["flags"] == {"int8"}  # Q/DQ present, fp16_mode=False
    assert calls["profile"] == {"img": ((1, 3, 32, 32), (1, 3, 64, 96), (1, 3, 128, 128)),
                                "img_hw": ((2,), (2,), (2,))}
    assert any("INT8 from the Q/DQ nodes" in m for m in messages)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["tiny.engine"]


def test_build_reports_every_parser_error(use_fake, tiny_onnx, trt_deploy, tmp_path):
    use_fake(parser_errors=[("nms", "NonMaxSuppression", "bad boxes"), ("topk", "TopK", "K too big")])
    with pytest.raises(UserError, match=r"rejected the graph \(2 error\(s\)\): node nms \(NonMaxSuppression\): "
                                        r"bad boxes; node topk \(TopK\): K too big"):
        build_engine(tiny_onnx, tmp_path / "x.engine", trt_deploy, log=lambda m: None)
    assert not (tmp_path / "x.engine").exists()


def test_fp16_mode_on_tensorrt_without_fp16_flag(use_fake, tiny_onnx, trt_deploy, tmp_path):
    calls = use_fake(version="11.0-fake", has_precision_flags=False)
    fp16 = dataclasses.replace(trt_deploy, backend=dataclasses.replace(trt_deploy.backend, fp16_mode=True))
    with pytest.raises(UserError, match="fp16_mode: TensorRT 11.0-fake has no FP16 builder flag"):
        build_engine(tiny_onnx, tmp_path / "x.engine", fp16, log=lambda m: None)
    build_engine(tiny_onnx, tmp_path / "x.engine", trt_deploy, log=lambda m: None)
    assert calls["flags"] == set()  # strongly typed: INT8 from Q/DQ without a flag


def test_profile_must_fit_the_graph_inputs(use_fake, trt_deploy, tmp_path):
    use_fake()
    model = tiny_detector_onnx()
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_value, dims[3].dim_value = 64, 96  # a static export
    onnx.save(model, tmp_path / "static.onnx")
    with pytest.raises(UserError, match=r"input_shapes.img.min_shape: \[1, 3, 32, 32\] does not fit the "
                                        r"graph's input shape \[1, 3, 64, 96\]"):
        build_engine(tmp_path / "static.onnx", tmp_path / "x.engine", trt_deploy, log=lambda m: None)
    model = tiny_detector_onnx()
    model.graph.input.append(helper.make_tensor_value_info("extra", TensorProto.FLOAT, ["n"]))
    onnx.save(model, tmp_path / "extra.onnx")
    with pytest.raises(UserError, match=r"input_shapes.extra: missing; the graph's input 'extra' has dynamic"):
        build_engine(tmp_path / "extra.onnx", tmp_path / "x.engine", trt_deploy, log=lambda m: None)
    assert not (tmp_path / "x.engine").exists()


# --------------------------------------------------------------------- with TensorRT


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The tiny graph built once into an engine (skips where TensorRT or a GPU is missing)."""
    available, why = tensorrt_available()
    if not available:
        pytest.skip(why)
    folder = tmp_path_factory.mktemp("tensorrt")
    onnx.save(tiny_detector_onnx(), folder / "tiny.onnx")
    (folder / "tiny_tensorrt.py").write_text(TRT_DEPLOY)
    engine = build_engine(folder / "tiny.onnx", folder / "tiny.engine",
                          load_deploy_config(folder / "tiny_tensorrt.py"),
                          timing_cache=folder / "timing.cache", log=print)
    return folder, engine


@pytest.mark.tensorrt
def test_build_writes_engine_and_timing_cache_only(built):
    folder, engine = built
    assert engine.stat().st_size > 0 and (folder / "timing.cache").stat().st_size > 0
    assert sorted(p.name for p in folder.iterdir()) == ["timing.cache", "tiny.engine", "tiny.onnx",
                                                        "tiny_tensorrt.py"]


@pytest.mark.tensorrt
@pytest.mark.parametrize("h, w, seed", [(64, 96, 1), (128, 32, 2)])
def test_engine_matches_onnxruntime(built, h, w, seed):
    folder, engine = built
    img, img_hw = example(h, w, seed)
    expected = by_score(run_ort(folder / "tiny.onnx", img, img_hw))
    outputs = TensorRTRunner(engine)(torch.from_numpy(img), torch.from_numpy(img_hw))
    assert [o.device.type for o in outputs] == ["cpu"] * 4
    assert [o.dtype for o in outputs] == [torch.float32, torch.float32, torch.int64, torch.float32]
    got = by_score([o.numpy() for o in outputs])
    assert got[1].shape == expected[1].shape, "detection count differs from onnxruntime"
    np.testing.assert_allclose(got[0], expected[0], atol=1e-3)
    np.testing.assert_allclose(got[1], expected[1], atol=1e-5)
    np.testing.assert_array_equal(got[2], expected[2])
    np.testing.assert_allclose(got[3], expected[3], atol=1e-5)


@pytest.mark.tensorrt
def test_runner_rejects_an_image_outside_the_profile(built):
    img, img_hw = example(160, 64, seed=3)
    with pytest.raises(UserError, match=r"input img of shape \[1, 3, 160, 64\] is outside"):
        TensorRTRunner(built[1])(torch.from_numpy(img), torch.from_numpy(img_hw))
