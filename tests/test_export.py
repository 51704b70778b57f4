"""The exported QDQ graph of tiny Mask R-CNN / Cascade detectors: structure, TensorRT rules, exactness."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from repq_export.config_source import load_config
from repq_export.evaluation.parity import (backend_output, compare_codes, compare_float_parts, find_code_probes,
                                          match_detections, with_probe_outputs)
from repq_export.export.forms import TENSORRT
from repq_export.export.onnx_export import count_qdq, export_onnx
from repq_export.export.trt_check import check_tensorrt_compat
from repq_export.models.build import build_detector
from repq_export.models.random_checkpoint import init_random_weights
from repq_export.quant.calibrate import quantize
from repq_export.quant.integer_bias import bias_grid
from repq_export.quant.layers import QuantConv2d, QuantLinear, named_quantizers
from repq_export.quant.log_sqrt2 import LogSqrt2Quantizer
from repq_export.boundary import NetOutput

CONFIGS = {"mask": "configs/tiny/mask_rcnn_tiny.py", "cascade": "configs/tiny/cascade_mask_rcnn_tiny.py"}
IMG_HW = torch.tensor([150.0, 210.0])


def tiny_float_model(kind: str):
    """A tiny random detector with confident classes (every image fills keep_top_k), in float."""
    model = build_detector(load_config(CONFIGS[kind]))
    init_random_weights(model, 0)
    heads = model.roi_head.bbox_head if isinstance(model.roi_head.bbox_head, torch.nn.ModuleList) else [
        model.roi_head.bbox_head]
    with torch.no_grad():
        for head in heads:
            head.fc_cls.bias[:3] += 6.0
    return model


def tiny_quant_model(kind: str, bits: int = 4):
    """A tiny random detector with confident classes, calibrated at W`bits`A`bits` on one random image."""
    model = tiny_float_model(kind)
    torch.manual_seed(0)
    img = torch.randn(1, 3, 160, 224)
    return quantize(model, [(img, IMG_HW)], bits, bits, progress=False), img


@pytest.fixture(scope="module", params=["mask", "cascade"])
def exported(request, tmp_path_factory):
    qmodel, img = tiny_quant_model(request.param)
    path = tmp_path_factory.mktemp(request.param) / "model.onnx"
    proto = export_onnx(qmodel, path, img, IMG_HW, form=TENSORRT)
    return request.param, qmodel, img, path, proto


def session(path, level: str) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def test_qdq_structure_matches_the_quantizers(exported):
    _, qmodel, _, _, proto = exported
    quantizers = list(named_quantizers(qmodel))
    log = sum(isinstance(q, LogSqrt2Quantizer) for _, q in quantizers)
    weights = sum(1 for n, _ in quantizers if n.endswith("weight_quantizer"))
    activations = len(quantizers) - log - weights
    counts = count_qdq(proto)
    # every weight: one int8 initializer and a DequantizeLinear per call; every uniform activation: a
    # Q/DQ pair per call (the RPN's three convs are shared by the 5 levels: 4 extra calls each)
    rpn_extra_calls = 3 * 4
    assert counts["int8_weights"] == weights
    assert counts["QuantizeLinear"] == activations + rpn_extra_calls
    assert counts["DequantizeLinear"] == weights + activations + 2 * rpn_extra_calls
    lnorm = [n for n in proto.graph.node if n.op_type == "LayerNormalization"]
    assert len(lnorm) > 0 and proto.opset_import[0].version >= 17
    for init in proto.graph.initializer:  # every zero point 0
        if "Constant" in init.name and init.data_type == onnx.TensorProto.INT8 and len(init.dims) <= 1:
            assert not np.any(onnx.numpy_helper.to_array(init))


def test_graph_passes_tensorrt_rules_and_onnx_checker(exported):
    _, _, _, _, proto = exported
    onnx.checker.check_model(proto, full_check=True)
    assert [i for i in check_tensorrt_compat(proto) if i.severity == "error"] == []


def test_codes_of_every_quantizer_equal_fake_quant(exported):
    _, qmodel, img, path, proto = exported
    probes = find_code_probes(proto, {n for n, _ in named_quantizers(qmodel)})
    assert {p.kind for p in probes} == {"uniform", "shifted", "log_sqrt2"}
    debug = ort.InferenceSession(with_probe_outputs(proto, probes).SerializeToString(),
                                 providers=["CPUExecutionProvider"])
    values = dict(zip([o.name for o in debug.get_outputs()],
                      debug.run(None, {"img": img.numpy(), "img_hw": IMG_HW.numpy()})))
    reports = {}
    compare_codes(qmodel, probes, values, reports)
    assert sum(r.elements for r in reports.values()) > 1_000_000
    assert sum(r.mismatches - r.tie_mismatches for r in reports.values()) == 0


def test_float_parts_fed_the_backend_codes(exported):
    """The teacher-forced torch run behind the parity check's 'float parts' line: each quantizer's
    forced output is exactly what fake quant makes of the backend's input (tier 1 makes them equal),
    the image enters both runs identically, and later inputs differ by float rounding only."""
    _, qmodel, img, path, proto = exported
    quantizers = dict(named_quantizers(qmodel))
    probes = find_code_probes(proto, set(quantizers))
    debug = ort.InferenceSession(with_probe_outputs(proto, probes).SerializeToString(),
                                 providers=["CPUExecutionProvider"])
    values = dict(zip([o.name for o in debug.get_outputs()],
                      debug.run(None, {"img": img.numpy(), "img_hw": IMG_HW.numpy()})))
    for probe in probes:
        q = quantizers[probe.name]
        with torch.no_grad():
            want = q(torch.from_numpy(np.asarray(values[probe.x], dtype=np.float32)))
        assert torch.equal(backend_output(q, probe, values).reshape(want.shape), want), probe.call
    reports = {}
    compare_float_parts(qmodel, probes, values, img, IMG_HW, reports)
    first = reports[probes[0].call]
    assert first.float_values > 0 and first.float_differ == 0  # the normalized image itself
    measured = [r for r in reports.values() if r.float_values]
    assert len(measured) > 20 and not any(r.call.startswith("/roi_head") for r in measured)
    ulps = sum(r.float_abs_diff for r in measured) / sum(r.float_ulp_sum for r in measured)
    assert 0 < ulps < 16  # rounding-sized: a wrongly forced output would move later inputs by whole steps


def test_default_optimization_level_equals_unoptimized(exported):
    """The onnxruntime hazard (int16 saturation on AVX2 without VNNI): fused integer kernels must not change the result."""
    _, _, _, path, _ = exported
    torch.manual_seed(3)
    feeds = {"img": torch.randn(1, 3, 192, 256).numpy(), "img_hw": np.array([185.0, 250.0], np.float32)}
    fused = session(path, "ORT_ENABLE_ALL").run(None, feeds)
    plain = session(path, "ORT_DISABLE_ALL").run(None, feeds)
    assert len(fused[0]) == len(plain[0]) > 0
    for a, b in zip(fused, plain):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)


def test_onnxruntime_detections_match_fake_quant(exported):
    _, qmodel, img, path, _ = exported
    out = session(path, "ORT_ENABLE_ALL").run(None, {"img": img.numpy(), "img_hw": IMG_HW.numpy()})
    with torch.no_grad():
        ref = qmodel(img, IMG_HW)
    match = match_detections(NetOutput(*ref), NetOutput(*(torch.from_numpy(o) for o in out)))
    assert match.ref == match.got > 0
    assert match.matched >= 0.95 * match.ref  # random weights: near-tied scores may reorder a few
    assert match.mean_mask_iou > 0.95


def test_export_is_byte_identical(exported, tmp_path):
    kind, qmodel, img, path, _ = exported
    again = tmp_path / "again.onnx"
    export_onnx(copy.deepcopy(qmodel), again, img, IMG_HW, form=TENSORRT)
    assert again.read_bytes() == path.read_bytes()


def test_biases_sit_on_the_int32_grid():
    qmodel, _ = tiny_quant_model("mask")
    checked = 0
    for module in qmodel.modules():
        if isinstance(module, (QuantConv2d, QuantLinear)) and module.bias is not None:
            units = module.bias / bias_grid(module)
            assert torch.allclose(units, torch.round(units), atol=1e-3)
            checked += 1
    assert checked > 20
