"""Tiers 2 and 3 against the float64 run: the bootstrap's AP is pycocotools' AP, the honest onnxruntime
graph passes, and broken graphs whose quantizers are intact (tier 1 passes them) FAIL."""
from __future__ import annotations

import onnx
import numpy as np
import pytest

from repq_export.commands.demo import BUNDLED, DEMO_SEED
from repq_export.data.coco import CocoDataset
from repq_export.data.synthetic import make_synthetic_coco
from repq_export.evaluation import graph_breakages as gb
from repq_export.evaluation.bootstrap import interval, per_image_matches, resample_weights, weighted_ap
from repq_export.evaluation.coco_eval import evaluate_coco
from repq_export.evaluation.envelope import MIN_IMAGES, Float64Reference, judge_envelope
from repq_export.evaluation.evaluate import coco_results
from repq_export.evaluation.image_loop import run_dataset
from repq_export.evaluation.parity_check import ParityOptions, check_parity, probe_codes
from repq_export.artifact.artifact_file import Artifact
from repq_export.artifact.detector import fake_quant_model
from repq_export.export.artifact import ExportRequest, export_artifact
from repq_export.runtime.ort_runner import OrtRunner
from repq_export.runtime.torch_runner import TorchRunner

NAME, CKPT, CONFIG = BUNDLED[0]  # Mask R-CNN


def artifact(root, images: int, seed: int):
    """The bundled Mask R-CNN exported at W4A4 (calibrated on the first image) and a synthetic val set."""
    ann = make_synthetic_coco(root / "data", "val", images, seed)
    dataset = CocoDataset(ann, root / "data" / "val")
    out = root / "w4a4"
    export_artifact(ExportRequest(ckpt=CKPT, out=out, w_bits=4, a_bits=4, config=CONFIG,
                                  calib_paths=[dataset[0][1]], accept_accuracy_loss=True, force=True), progress=False,
                   log=lambda *_: None)
    return out, dataset


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    out, dataset = artifact(tmp_path_factory.mktemp("verdict"), 6, 11)
    opened = Artifact.open(out)
    qmodel, settings = fake_quant_model(opened), opened.preprocess
    return out, dataset, qmodel, settings


def broken(out, proto: onnx.ModelProto, name: str):
    path = out.parent / f"{name}.onnx"
    onnx.save(proto, path)
    return path


def verdict(small, onnx_path, code_images=0):
    out, dataset, qmodel, settings = small
    options = ParityOptions(code_images=code_images, progress=False, samples=200, float_parts=False)
    report, _, _ = check_parity(qmodel, TorchRunner(qmodel, name="quant"), OrtRunner(onnx_path), dataset, settings,
                                options, onnx_path, ideal=Float64Reference(qmodel))
    return report


@pytest.fixture(scope="module")
def reference_runs(small):
    """Float64 and torch float32 fake quant on the small set, shared by the tests that judge a graph."""
    out, dataset, qmodel, settings = small
    return (run_dataset(Float64Reference(qmodel), dataset, settings, progress=False),
            run_dataset(TorchRunner(qmodel, name="quant"), dataset, settings, progress=False))


def judged(small, reference_runs, onnx_path):
    out, dataset, qmodel, settings = small
    run = run_dataset(OrtRunner(onnx_path), dataset, settings, progress=False)
    return judge_envelope(*reference_runs, run, dataset, samples=200)


def test_weighted_ap_is_pycocotools_ap_over_any_subset(small, reference_runs):
    out, dataset, qmodel, settings = small
    run = reference_runs[1]
    bbox, segm = coco_results(run, dataset)
    ids = run.image_ids
    for metric, results in (("bbox", bbox), ("segm", segm)):
        cats = per_image_matches(dataset.coco, results, metric, ids)
        for keep in (ids, ids[1:4], ids[::2]):
            weights = np.array([1.0 if i in keep else 0.0 for i in ids])
            want = evaluate_coco(dataset.coco, bbox, segm, metrics=(metric,), img_ids=keep)[f"{metric}_mAP"]
            assert weighted_ap(cats, weights) == pytest.approx(want, abs=1e-12)
        assert 0.2 < weighted_ap(cats, np.ones(len(ids))) < 1.0


def test_bootstrap_draws_and_interval():
    w = resample_weights(7, 500, seed=3)
    assert w.shape == (500, 7) and (w.sum(axis=1) == 7).all() and (w == 0).any()
    assert interval(np.arange(1001.0)) == pytest.approx((25.0, 975.0))


def test_honest_graph_passes_and_a_roi_align_mode_change_fails(small, reference_runs):
    out, dataset, qmodel, settings = small
    honest = judged(small, reference_runs, out / "model.onnx")
    assert honest.ok, [f.text() for f in honest.figures]
    assert honest.figure("matched").reference > 0.7  # torch float32 itself matches float64 on most
    path = broken(out, gb.with_roi_align_mode(onnx.load(out / "model.onnx"), "output_half_pixel"), "roi")
    roi = judged(small, reference_runs, path)
    matched = roi.figure("matched")
    assert matched.backend < matched.reference - 0.2 and matched.low > matched.margin and not matched.ok
    assert not roi.ok
    codes = probe_codes(qmodel, path, reference_runs[1].images[:1], OrtRunner(path), float_parts=False)
    assert sum(r.elements for r in codes) > 10**6 and sum(r.mismatches for r in codes) == 0  # tier 1 cannot see it


def test_a_quantizer_scale_off_by_a_step_fails_tier_1(small):
    out, dataset, qmodel, settings = small
    path = broken(out, gb.with_quantizer_scale(onnx.load(out / "model.onnx"), index=3, factor=1.5), "scale")
    report, _, _ = check_parity(qmodel, TorchRunner(qmodel, name="quant"), OrtRunner(path), dataset, settings,
                                ParityOptions(max_images=1, progress=False, float_parts=False), path)
    assert report.tier1_ok is False and report.code_mismatches > 0 and not report.ok


def test_float16_casts_add_nodes_and_change_outputs(small):
    out = small[0]
    proto = onnx.load(out / "model.onnx")
    half = gb.with_float16_outputs(proto)
    casts = sum(n.op_type == "LayerNormalization" or n.op_type == "Softmax" for n in proto.graph.node)
    assert len(half.graph.node) == len(proto.graph.node) + 2 * casts and casts > 20
    onnx.checker.check_model(half)


@pytest.mark.slow
@pytest.mark.parametrize("breakage", ["float16", "roi_align"])
def test_demo_set_fails_broken_graphs_and_passes_the_honest_one(breakage, tmp_path):
    """The demo's 50 images (seed 2026): float16 float parts (about 88% matched against torch float32's
    91%) FAIL tier 2, the honest graph passes."""
    out, dataset = artifact(tmp_path, 50, DEMO_SEED)
    opened = Artifact.open(out)
    qmodel, settings = fake_quant_model(opened), opened.preprocess
    proto = onnx.load(out / "model.onnx")
    bad = gb.with_float16_outputs(proto) if breakage == "float16" else gb.with_roi_align_mode(proto, "output_half_pixel")
    case = (out, dataset, qmodel, settings)
    assert verdict(case, out / "model.onnx").ok
    report = verdict(case, broken(out, bad, breakage), code_images=1)
    assert report.tier1_ok and not report.tier2_ok and not report.ok, report.table()


def test_tensorrt_goes_through_the_same_rule(request):
    """Where TensorRT runs: the engine of the exported graph is judged against float64 like onnxruntime."""
    from repq_export.deploy_config import load_deploy_config
    from repq_export.export.tensorrt_builder import build_engine, tensorrt_available
    from repq_export.resources import DEPLOY_CONFIGS_DIR
    from repq_export.runtime.trt_runner import TensorRTRunner

    ok, why = tensorrt_available()
    if not ok:
        pytest.skip(why)
    out, dataset, qmodel, settings = request.getfixturevalue("small")
    deploy = load_deploy_config(DEPLOY_CONFIGS_DIR / "instance-seg_tensorrt-int8_dynamic-320x320-1344x1344.py")
    build_engine(out / "model.onnx", out / "model.engine", deploy)
    report, _, _ = check_parity(qmodel, TorchRunner(qmodel, name="quant"), TensorRTRunner(out / "model.engine"),
                                dataset, settings, ParityOptions(progress=False, samples=200),
                                ideal=Float64Reference(qmodel))
    assert report.envelope is not None and report.envelope.images == len(dataset)
    assert report.ok, report.table()


def test_too_few_images_leave_tiers_2_and_3_unjudged(small):
    """On fewer images than the float64 rule needs there is no interval: tiers 2/3 say so instead of judging."""
    out, dataset, qmodel, settings = small
    onnx_path = out / "model.onnx"
    options = ParityOptions(max_images=MIN_IMAGES - 1, code_images=1, progress=False, samples=50, float_parts=False)
    report, _, _ = check_parity(qmodel, TorchRunner(qmodel, name="quant"), OrtRunner(onnx_path), dataset, settings,
                                options, onnx_path, ideal=Float64Reference(qmodel))
    assert not report.envelope.judged and report.tier2_ok is None and report.tier3_ok is None
    assert report.tier1_ok and report.ok  # tier 1 still judges: 0 codes differ
    assert "NOT JUDGED" in report.table()
    assert report.as_dict()["float64_envelope"]["pass"] is None
