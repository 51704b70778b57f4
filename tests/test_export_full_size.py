"""Full-size Mask R-CNN Swin-T and Cascade Swin-S (random weights): export in the TensorRT form (and
Swin-T in the onnxruntime form), the form's rules, parity tiers 1-2.

Slow (minutes each on a 2-core CPU): run with `pytest -m slow tests/test_export_full_size.py`.
"""

from __future__ import annotations

import onnxruntime as ort
import pytest
import torch

from repq_export.evaluation.parity import compare_codes, find_code_probes, match_detections, with_probe_outputs
from repq_export.export.forms import ONNXRUNTIME, TENSORRT
from repq_export.export.onnx_export import count_qdq, export_onnx
from repq_export.export.ort_check import check_onnxruntime_form
from repq_export.export.trt_check import check_tensorrt_compat
from repq_export.models.arch import ARCHS
from repq_export.models.build import build_detector
from repq_export.models.mmdet_config import config_from_arch
from repq_export.models.random_checkpoint import init_random_weights
from repq_export.quant.calibrate import quantize
from repq_export.quant.layers import named_quantizers
from repq_export.boundary import NetOutput

pytestmark = pytest.mark.slow


CASES = [("mask_rcnn_swin_t", TENSORRT), ("cascade_swin_s", TENSORRT), ("mask_rcnn_swin_t", ONNXRUNTIME)]


@pytest.fixture(scope="module", params=CASES, ids=[f"{a}-{f}" for a, f in CASES])
def full_size(request, tmp_path_factory):
    """A calibrated full-size detector, its graph, and the graph's outputs with every probe."""
    (arch, form), tmp_path = request.param, tmp_path_factory.mktemp(request.param[0])
    torch.manual_seed(0)
    model = build_detector(config_from_arch(ARCHS[arch]))
    init_random_weights(model, 0)
    heads = model.roi_head.bbox_head
    with torch.no_grad():
        for head in heads if isinstance(heads, torch.nn.ModuleList) else [heads]:
            head.fc_cls.bias[:5] += 6.0  # a few confident classes, so the mask head calibrates
    img, img_hw = torch.randn(1, 3, 800, 1216), torch.tensor([800.0, 1199.0])
    qmodel = quantize(model, [(img, img_hw)], 4, 4, progress=False)
    proto = export_onnx(qmodel, tmp_path / "model.onnx", img, img_hw, form=form)
    if form == TENSORRT:
        assert [i for i in check_tensorrt_compat(proto) if i.severity == "error"] == []
    else:
        assert check_onnxruntime_form(proto) == []
    quantizers = dict(named_quantizers(qmodel))
    weights = sum(1 for n in quantizers if n.endswith("weight_quantizer"))
    assert count_qdq(proto)["int8_weights"] == weights
    probes = find_code_probes(proto, set(quantizers))
    assert {p.name for p in probes} == {n for n in quantizers if not n.endswith("weight_quantizer")}
    session = ort.InferenceSession(with_probe_outputs(proto, probes).SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    values = dict(zip(names, session.run(None, {"img": img.numpy(), "img_hw": img_hw.numpy()})))
    return qmodel, img, img_hw, probes, values


def test_full_size_codes_equal_fake_quant(full_size):
    qmodel, _, _, probes, values = full_size
    reports = {}
    compare_codes(qmodel, probes, values, reports)
    assert sum(r.elements for r in reports.values()) > 10_000_000
    assert sum(r.mismatches - r.tie_mismatches for r in reports.values()) == 0  # tier 1


@pytest.mark.xfail(strict=True, reason="float differences flip 4-bit codes and the flips propagate through "
                   "12-24 blocks: on random full-size weights only ~37% of detections match (docs/parity.md)")
def test_full_size_detections_match(full_size):
    qmodel, img, img_hw, _, values = full_size
    with torch.no_grad():
        ref = NetOutput(*qmodel(img, img_hw))
    got = NetOutput(*(torch.from_numpy(values[n]) for n in ("boxes", "scores", "labels", "masks")))
    match = match_detections(ref, got)
    assert match.ref > 0 and match.matched >= 0.95 * max(match.ref, match.got)  # tier 2
