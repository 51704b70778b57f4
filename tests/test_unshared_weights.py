"""export/unshared_weights.py: each weight DequantizeLinear gets its own codes, the graph computes the same values,
and OpenVINO compiled for a static shape keeps every quantized conv on int8 only then."""

from __future__ import annotations

import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from repq_export.export.forms import TENSORRT
from repq_export.export.onnx_export import export_onnx
from repq_export.export.unshared_weights import COPY_SUFFIX, shared_weight_codes, unshare_weight_codes
from repq_export.graph_targets import LogSqrt2Lowering
from repq_export.runtime.openvino_runner import openvino_available

from cli_helpers import REPO
from test_export import IMG_HW, tiny_quant_model

OV_OK, OV_WHY = openvino_available()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny Mask R-CNN at W4A4 in the OpenVINO deploy config's graph, with the RPN's codes still shared."""
    qmodel, img = tiny_quant_model("mask", 4)
    path = tmp_path_factory.mktemp("unshare") / "shared.onnx"
    proto = export_onnx(qmodel, path, img, IMG_HW, form=TENSORRT, roi_nan_guard=True,
                        log_sqrt2=LogSqrt2Lowering.BISECT)
    return proto, {"img": img.numpy(), "img_hw": IMG_HW.numpy()}


def unshared(proto: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    unshare_weight_codes(out)
    return out


def reshared(proto: onnx.ModelProto) -> onnx.ModelProto:
    """The rewrite undone: every copy's reader points at the original codes again (the copies stay, unread)."""
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    for node in out.graph.node:
        if node.op_type == "DequantizeLinear" and COPY_SUFFIX in node.input[0]:
            node.input[0] = node.input[0].split(COPY_SUFFIX)[0]
    return out


def run_ort(proto: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)


def test_each_weight_dequantize_gets_its_own_codes_and_the_outputs_stay_bit_for_bit(tiny):
    proto, feeds = tiny
    shared = shared_weight_codes(proto)
    assert shared >= 3  # the RPN's conv, cls and reg, each called once per FPN level
    out = unshared(proto)
    assert shared_weight_codes(out) == 0 and len(out.graph.initializer) == len(proto.graph.initializer) + shared
    assert unshare_weight_codes(out) == 0  # a second run finds nothing to do
    onnx.checker.check_model(out, full_check=True)
    want, got = run_ort(proto, feeds), run_ort(out, feeds)
    assert want[0].shape[0] > 0 and all(np.array_equal(a, b) for a, b in zip(want, got))
    assert shared_weight_codes(reshared(out)) == shared


@pytest.mark.skipif(not OV_OK, reason=OV_WHY)
def test_openvino_static_compile_runs_every_quantized_conv_int8_only_unshared(tiny, tmp_path):
    """Compiled for the input's shape, OpenVINO folds shared weight codes into f32 weights: the shared RPN convs
    leave int8. Unshared, all 29 quantized convs of the tiny model run int8 (as with dynamic shapes)."""
    sys.path.insert(0, str(REPO / "tools"))
    import bench_cpu

    proto, feeds = tiny
    counts = {}
    for name, graph in (("unshared", unshared(proto)), ("reshared", reshared(unshared(proto)))):
        path = tmp_path / f"{name}.onnx"
        onnx.save(graph, path)
        counts[name] = bench_cpu.ov_int8_layers(bench_cpu.ov_compile(str(path), "f32", 1, feeds=feeds))["Convolution"]
    assert counts["unshared"] == "29/29", counts
    assert int(counts["reshared"].split("/")[0]) < 29, counts
