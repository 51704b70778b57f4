"""tools/bench_accuracy.py on the tiny config: every row is made and scored, and float's AP is tools/test.py's."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from cli_helpers import REPO, TINY_MASK, make_checkpoint

sys.path.insert(0, str(REPO / "tools"))
import bench_accuracy  # noqa: E402

HAVE_OPENVINO = importlib.util.find_spec("openvino") is not None
IMAGES = 3


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str, Path, Path]:
    """One in-process run of the benchmark's quick path on a random tiny Mask R-CNN: (rows, Markdown, ckpt, workdir)."""
    root = tmp_path_factory.mktemp("bench_accuracy")
    ckpt = make_checkpoint(root / "tiny.pth")
    backends = ["onnxruntime", "OpenVINO"] if HAVE_OPENVINO else ["onnxruntime"]
    out, js = root / "bench.md", root / "bench.json"
    rc = bench_accuracy.main(["--ckpt", str(ckpt), "--config", str(TINY_MASK), "--quick", "--num-images", str(IMAGES),
                              "--calib-images", "2", "--holdout", "1", "--bits", "4", "--recon-bits", "4",
                              "--recon-iters", "1", "--threads", "1", "--one-thread-images", "0",
                              "--backends", *backends, "--workdir", str(root / "work"), "--out", str(out),
                              "--json-out", str(js), "--in-process"])
    assert rc == 0
    return json.loads(js.read_text())["tiny"], out.read_text(), ckpt, root / "work"


def test_every_row_is_scored(bench) -> None:
    rows, text, _, _ = bench
    keys = ["float", "qstatic_minmax", "qstatic_percentile", "w4a4", "w4a4_recon_1it"]
    expected = [(k, "onnxruntime") for k in keys]
    if HAVE_OPENVINO:  # quantize_static on OpenVINO only with --qstatic-openvino
        expected += [(k, "OpenVINO") for k in keys if not k.startswith("qstatic")]
    assert [(r["key"], r["backend"]) for r in rows] == expected
    for r in rows:
        assert r["images"] == IMAGES, r
        assert 0.0 <= r["box_ap"] <= 1.0 and 0.0 <= r["mask_ap"] <= 1.0 and r["ms"] > 0, r
    assert "| repq-export --recon | onnxruntime | W4A4 |" in text
    assert "| quantize_static Percentile | onnxruntime | INT8 (W8A8) |" in text
    assert "seed 77077" in text and "Command: `" in text


def test_float_ap_is_tools_test_py_ap(bench, tmp_path: Path) -> None:
    """The float row's AP is what `tools/test.py --backend ort --model float.onnx` reports on the same images."""
    from repq_export.commands.test_tool import main as test_main

    rows, _, ckpt, work = bench
    float_row = next(r for r in rows if r["key"] == "float" and r["backend"] == "onnxruntime")
    val = work / f"val-seed{bench_accuracy.VAL_SEED}-{IMAGES}"
    metrics = tmp_path / "metrics.json"
    assert test_main([str(TINY_MASK), str(ckpt), "--backend", "ort", "--model", float_row["ort"], "--ann",
                      str(val / "annotations/instances_val.json"), "--img-dir", str(val / "val"),
                      "--device", "cpu", "--json-out", str(metrics), "--quiet"]) == 0
    reference = json.loads(metrics.read_text())
    assert reference["images"] == IMAGES
    assert reference["bbox_mAP"] > 0  # a number that can disagree, not 0 == 0
    assert float_row["box_ap"] == pytest.approx(reference["bbox_mAP"], abs=1e-9)
    assert float_row["mask_ap"] == pytest.approx(reference["segm_mAP"], abs=1e-9)
