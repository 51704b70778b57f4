"""Bad input through the command line (issues 2, 3, 4): every case ends with exit code 2 and exactly one
stderr line, `error: ...`, naming the file or option; no traceback; nothing written anywhere.

Most cases call the command's `main(argv)` in this process (the console script does just that, after
its imports); at least one case per command runs a fresh interpreter to prove the exit code itself.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from cli_helpers import CLI, PARITY_PY, REPO, TEST_PY, TINY_MASK, call_main, run_cli, tiny_artifact
from repq_export import cli
from repq_export.commands import parity_tool, test_tool
from repq_export.config_source import load_config
from repq_export.models.build import build_detector
from repq_export.quant.assign import quantize_modules
from repq_export.quant.state import read_quant_state

TINY_CASCADE = REPO / "configs/tiny/cascade_mask_rcnn_tiny.py"
TRT_DYNAMIC = REPO / "deploy_configs/instance-seg_tensorrt-int8_dynamic-320x320-1344x1344.py"
ORT_CPU = REPO / "deploy_configs/instance-seg_onnxruntime_cpu.py"


def tree(root: Path) -> set[str]:
    """Every path under `root`, to see that a failed command left nothing behind."""
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def assert_one_error(result, *names) -> str:
    """Exit code 2, one stderr line `error: ...` that mentions each of `names`, no traceback."""
    lines = [line for line in result.err.splitlines() if line.strip()]
    assert result.rc == 2, (result.rc, result.err[-2000:])
    assert "Traceback" not in result.err + result.out
    assert len(lines) == 1, result.err
    assert lines[0].startswith("error: ") and len(lines[0]) > len("error: ")
    for name in names:
        assert str(name) in lines[0], (name, lines[0])
    return lines[0]


# ----------------------------------------------------------------------------- inputs


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    return tiny_artifact(tmp_path_factory)


@pytest.fixture(scope="module")
def bad(art, tmp_path_factory) -> dict[str, Path]:
    """Broken inputs of every kind, next to a folder `work` that the commands may (not) write into."""
    d = tmp_path_factory.mktemp("bad")
    ckpt = torch.load(art.ckpt, weights_only=True)
    sd = ckpt["state_dict"]

    def save(name, state_dict):
        torch.save({"meta": ckpt["meta"], "state_dict": state_dict}, d / name)
        return d / name

    def write(name, data):
        path = d / name
        path.write_bytes(data) if isinstance(data, bytes) else path.write_text(data)
        return path

    coco = json.loads(art.ann.read_text())
    first = coco["images"][0]["file_name"]
    files = {
        "ckpt": art.ckpt, "ann": art.ann, "img_dir": art.img_dir, "artifact": art.path,
        "missing": d / "no_such.pth", "work": d / "work", "bad_img_dir": d / "bad_images",
        "no_images": d / "no_images",
        "truncated": write("truncated.pth", art.ckpt.read_bytes()[:100_000]),
        "text": write("notes.pth", "not a checkpoint\n"),
        "resnet": save("resnet.pth", {  # the key names of an mmdet ResNet-50 Mask R-CNN
            "backbone.conv1.weight": torch.zeros(64, 3, 7, 7), "backbone.bn1.weight": torch.ones(64),
            "backbone.layer1.0.conv1.weight": torch.zeros(64, 64, 1, 1),
            "neck.lateral_convs.0.conv.weight": torch.zeros(256, 256, 1, 1),
            "rpn_head.rpn_conv.weight": torch.zeros(256, 256, 3, 3),
            "roi_head.bbox_head.fc_cls.weight": torch.zeros(81, 1024)}),
        "missing_keys": save("missing_keys.pth", {  # 18 LayerNorm biases: ten listed, then a count
            k: v for k, v in sd.items() if not k.endswith(("norm1.bias", "norm2.bias"))}),
        "unexpected_keys": save("unexpected_keys.pth", {**sd, "backbone.extra_head.weight": torch.zeros(3)}),
        "wrong_shape": save("wrong_shape.pth", {**sd, "neck.fpn_convs.0.conv.bias": torch.zeros(31)}),
        "not_coco": write("not_coco.json", json.dumps({"info": "hello"})),
        "empty": write("empty.json", json.dumps({**coco, "images": [], "annotations": []})),
        "deploy_unknown": write("deploy_unknown.py", ORT_CPU.read_text() + "\nbatch_size = 4\n"),
    }
    trt = TRT_DYNAMIC.read_text()
    assert "min_shape=[1, 3, 320, 320]" in trt
    files["deploy_min_max"] = write("deploy_min_max.py", trt.replace("min_shape=[1, 3, 320, 320]",
                                                                     "min_shape=[1, 3, 1408, 320]"))
    files["work"].mkdir()
    shutil.copytree(art.img_dir, files["bad_img_dir"])
    files["bad_image"] = files["bad_img_dir"] / first
    files["bad_image"].write_bytes(b"\x89PNG\r\n\x1a\n but not really")
    files["no_images"].mkdir()
    (files["no_images"] / "README.txt").write_text("no pictures here\n")
    return files


def export_argv(bad, **change) -> list:
    """A valid export command line with some options changed (None drops an option)."""
    opts = {"--ckpt": bad["ckpt"], "--config": TINY_MASK, "--bits": 4, "--calib": bad["img_dir"],
            "--out": bad["work"] / "artifact", "--quiet": True, "--accept-accuracy-loss": True}
    opts.update({f"--{k.replace('_', '-')}": v for k, v in change.items()})
    argv = []
    for flag, value in opts.items():
        if value is True:
            argv.append(flag)
        elif value is not None:
            argv += [flag, value]
    return argv


# ----------------------------------------------------------------------------- repq-export (export)


def test_engine_without_tensorrt_is_refused_before_any_work(art, bad, capsys):
    """`--engine` where TensorRT or a GPU is missing: one line saying which, before calibration, nothing written."""
    from repq_export.runtime.tensorrt_support import tensorrt_available

    available, _ = tensorrt_available()
    if available:
        assert art.export.rc == 0 and (art.path / "model.engine").is_file()
        return
    before = tree(bad["work"])
    result = call_main(cli.main, export_argv(bad, engine=True), capsys)
    line = assert_one_error(result, "--engine")
    assert "tensorrt" in line.lower() or "GPU" in line
    assert "calibrating" not in result.out and tree(bad["work"]) == before
    assert {p.name for p in art.path.iterdir()} == {"model.onnx", "quant.pth", "repq.json"}


def test_missing_checkpoint_subprocess(bad):
    before = tree(bad["work"])
    assert_one_error(run_cli(CLI, *export_argv(bad, ckpt=bad["missing"])), bad["missing"], "not found")
    assert tree(bad["work"]) == before


def test_bits_not_an_integer_subprocess(bad):
    """argparse errors are one line too (CommandParser), naming the option."""
    line = assert_one_error(run_cli(CLI, *export_argv(bad, bits="3.5")), "--bits", "3.5")
    assert "usage:" not in line
    assert not (bad["work"] / "artifact").exists()


EXPORT_CASES = {  # name -> (options changed, fragments the error line must hold)
    "truncated checkpoint": (dict(ckpt="truncated"), ["truncated.pth", "truncated"]),
    "not a checkpoint": (dict(ckpt="text"), ["notes.pth", "not a PyTorch checkpoint"]),
    "ResNet Mask R-CNN": (dict(ckpt="resnet", config=None), ["resnet.pth", "another architecture"]),
    "missing keys": (dict(ckpt="missing_keys", config=None),
                     ["missing_keys.pth", "missing keys", "backbone.layers.0.blocks.0.norm1.bias", "and 8 more"]),
    "unexpected keys": (dict(ckpt="unexpected_keys"), ["unexpected_keys.pth", "backbone.extra_head.weight"]),
    "wrong shape": (dict(ckpt="wrong_shape"), ["wrong_shape.pth", "neck.fpn_convs.0.conv.bias (31,)"]),
    "config does not match": (dict(config=TINY_CASCADE), ["does not match config", "cascade_mask_rcnn_tiny.py"]),
    "annotation file not COCO": (dict(calib=None, calib_ann="not_coco", calib_img_dir="img_dir"),
                                 ["not_coco.json", "not a COCO annotation file"]),
    "empty dataset": (dict(calib=None, calib_ann="empty", calib_img_dir="img_dir"), ["empty.json", "no images"]),
    "undecodable image": (dict(calib="bad_img_dir"), ["bad_images/000000000001.png", "cannot decode"]),
    "calibration folder without images": (dict(calib="no_images"), ["no_images", "no images"]),
    "bits 9": (dict(bits=9), ["--bits", "9", "2..8"]),
    "bits 1": (dict(bits=1), ["--bits", "1", "2..8"]),
    "w-bits 3.5": (dict(bits=None, w_bits="3.5", a_bits=4), ["--w-bits", "3.5"]),
    "no bits at all": (dict(bits=None), ["--bits"]),
    "out exists without --force": (dict(out="artifact"), ["already exists", "--force"]),
    "out is a file": (dict(out="ckpt"), ["tiny_mask.pth", "is --ckpt", "an input of this command"]),
    "out in a missing folder": (dict(out="missing_parent"), ["does not exist"]),
    "deploy config with an unknown key": (dict(deploy_config="deploy_unknown"), ["deploy_unknown.py", "batch_size",
                                                                                 "unknown key"]),
    "deploy profile min > max": (dict(deploy_config="deploy_min_max"), ["deploy_min_max.py", "min_shape[2]", "1408"]),
}


@pytest.mark.parametrize("case", list(EXPORT_CASES))
def test_export_bad_input(case, bad, capsys):
    change, fragments = EXPORT_CASES[case]
    paths = {**bad, "missing_parent": bad["work"] / "no/such/folder"}
    change = {k: paths.get(v, v) if isinstance(v, str) else v for k, v in change.items()}
    before = tree(bad["work"])
    assert_one_error(call_main(cli.main, export_argv(bad, **change), capsys), *fragments)
    assert tree(bad["work"]) == before


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs /proc, a folder nobody can write (even root)")
def test_unwritable_out(bad, capsys):
    """Caught before calibration: root passes os.access on /proc, so this needs a real probe."""
    result = call_main(cli.main, export_argv(bad, out="/proc/repq_artifact"), capsys)
    assert_one_error(result, "/proc/repq_artifact", "cannot create")
    assert "calibrating" not in result.out


# ----------------------------------------------------------------------------- other commands


def test_check_not_onnx_subprocess(bad):
    assert_one_error(run_cli(CLI, "check", bad["text"]), "notes.pth", "not an ONNX model")


def test_demo_bits_subprocess(bad):
    line = assert_one_error(run_cli(CLI, "demo", "--bits", "9"), "--bits", "9")
    assert "usage:" not in line


@pytest.fixture(scope="module")
def broken_artifacts(art, tmp_path_factory) -> dict[str, Path]:
    """Copies of the tiny artifact whose manifest no longer matches their files."""
    d = tmp_path_factory.mktemp("artifacts")
    out = {}
    for name in ("onnx_changed", "quant_truncated", "no_manifest", "bits_edited"):
        out[name] = Path(shutil.copytree(art.path, d / name, ignore=shutil.ignore_patterns("model.engine")))
    with open(out["onnx_changed"] / "model.onnx", "ab") as f:
        f.write(b"\0")
    quant = out["quant_truncated"] / "quant.pth"
    quant.write_bytes(quant.read_bytes()[:5000])
    (out["no_manifest"] / "repq.json").unlink()
    manifest = json.loads((out["bits_edited"] / "repq.json").read_text())
    (out["bits_edited"] / "repq.json").write_text(json.dumps({**manifest, "w_bits": 6}))
    return out


ARTIFACT_CASES = {
    "onnx_changed": ["model.onnx", "does not match the sha256"],
    "quant_truncated": ["quant.pth", "does not match the sha256"],
    "no_manifest": ["no_manifest", "no repq.json"],
    "bits_edited": ["quant.pth", "w_bits"],
}


def parity_argv(bad, artifact, *extra) -> list:
    return [artifact, "--ann", bad["ann"], "--img-dir", bad["img_dir"], "--quiet", *extra]


def test_parity_check_manifest_mismatch_subprocess(bad, broken_artifacts):
    before = tree(bad["work"])
    result = run_cli(PARITY_PY, *parity_argv(bad, broken_artifacts["onnx_changed"], "--json-out",
                                             bad["work"] / "parity.json"))
    assert_one_error(result, "onnx_changed/model.onnx", "sha256")
    assert tree(bad["work"]) == before


@pytest.mark.parametrize("case", list(ARTIFACT_CASES))
def test_parity_check_bad_artifact(case, bad, broken_artifacts, capsys):
    before = tree(bad["work"])
    result = call_main(parity_tool.main, parity_argv(bad, broken_artifacts[case], "--save-images",
                                                    bad["work"] / "pictures"), capsys)
    assert_one_error(result, case, *ARTIFACT_CASES[case])
    assert tree(bad["work"]) == before


def test_parity_check_bad_picture_options(bad, capsys):
    result = call_main(parity_tool.main, parity_argv(bad, bad["artifact"], "--save-plot", bad["work"] / "plot.gif"),
                       capsys)
    assert_one_error(result, "--save-plot", "plot.gif", ".png")
    result = call_main(parity_tool.main, parity_argv(bad, bad["artifact"], "--save-images",
                                                    bad["work"] / "no/such/dir"), capsys)
    assert_one_error(result, "--save-images", "does not exist")


def test_predict_manifest_mismatch_subprocess(bad, broken_artifacts):
    out = bad["work"] / "pred.png"
    result = run_cli(CLI, "predict", broken_artifacts["quant_truncated"], bad["img_dir"] / "000000000001.png",
                     "--save", out)
    assert_one_error(result, "quant_truncated/quant.pth", "sha256")
    assert not out.exists()


@pytest.mark.parametrize("case", ["onnx_changed", "no_manifest", "bits_edited"])
def test_predict_bad_artifact(case, bad, broken_artifacts, capsys):
    before = tree(bad["work"])
    backend = "quant" if case == "bits_edited" else "ort"  # the quant file is read by the fake-quant backend
    image = next(bad["img_dir"].iterdir())
    result = call_main(cli.main, ["predict", broken_artifacts[case], image, "--save", bad["work"] / "p.png",
                                  "--backend", backend], capsys)
    assert_one_error(result, case, *ARTIFACT_CASES[case])
    assert tree(bad["work"]) == before


def test_predict_bad_arguments(bad, capsys):
    before = tree(bad["work"])
    image = next(bad["img_dir"].iterdir())
    cases = [
        ([bad["artifact"], bad["bad_image"], "--save", bad["work"] / "p.png"], ["000000000001.png", "cannot decode"]),
        ([bad["artifact"], bad["work"] / "nope.png", "--save", bad["work"] / "p.png"],
         ["nope.png", "image file not found"]),
        ([bad["artifact"], image, "--save", bad["work"] / "no/such/p.png"], ["--save", "does not exist"]),
        ([bad["artifact"], image, "--save", bad["work"] / "p.gif"], ["--save", "p.gif"]),
        ([bad["artifact"], image, "--save", image], ["--save", "is IMAGE", "an input of this command"]),
        ([bad["artifact"], image, "--score-thr", "2"], ["--score-thr", "0..1"]),
    ]
    for argv, fragments in cases:
        assert_one_error(call_main(cli.main, ["predict", *argv], capsys), *fragments)
    assert tree(bad["work"]) == before


# ----------------------------------------------------------------------------- tools/test.py


def test_argv(bad, *extra, ann="ann", img_dir="img_dir", ckpt="ckpt") -> list:
    return [TINY_MASK, bad[ckpt], "--ann", bad[ann], "--img-dir", bad[img_dir], "--quiet", "--max-images", 1,
            "--json-out", bad["work"] / "metrics.json", *extra]


test_argv.__test__ = False  # a helper, not a test


@pytest.fixture(scope="module")
def quant_files(art, bad, tmp_path_factory) -> dict[str, Path]:
    """Quant files that must be refused for the tiny checkpoint: other model, other checkpoint, truncated."""
    d = tmp_path_factory.mktemp("quant")
    good = art.path / "quant.pth"
    manifest, _ = read_quant_state(good)
    cascade = build_detector(load_config(TINY_CASCADE))  # the structure of a quantized cascade model
    quantize_modules(cascade, 4, 4)
    torch.save({"manifest": json.dumps(manifest), "state_dict": cascade.state_dict()}, d / "cascade.pth")
    from cli_helpers import make_checkpoint

    other = make_checkpoint(d / "other_seed.pth", seed=5)
    (d / "truncated.pth").write_bytes(good.read_bytes()[:5000])
    return {"good": good, "cascade": d / "cascade.pth", "truncated": d / "truncated.pth", "other_ckpt": other}


def test_tools_test_other_bits_subprocess(bad, quant_files):
    before = tree(bad["work"])
    result = run_cli(TEST_PY, *test_argv(bad, "--load-quant", quant_files["good"], "--w_bits", 6, "--a_bits", 6))
    assert_one_error(result, "quant.pth", "w_bits=4", "w_bits=6")
    assert tree(bad["work"]) == before


TEST_PY_CASES = {
    "quant file from another model": (dict(extra=("--load-quant", "cascade")),
                                      ["cascade.pth", "does not fit this model", "roi_head.bbox_head"]),
    "quant file from another checkpoint": (dict(ckpt="other_ckpt", extra=("--load-quant", "good")),
                                           ["quant.pth", "another checkpoint", "other_seed.pth"]),
    "truncated quant file": (dict(extra=("--load-quant", "truncated")), ["truncated.pth", "truncated"]),
    "bits 3.5": (dict(extra=("--w_bits", "3.5")), ["--w_bits", "3.5"]),
    "bits 9": (dict(extra=("--a_bits", "9")), ["--a_bits", "9"]),
    "missing checkpoint": (dict(ckpt="missing"), ["no_such.pth", "not found"]),
    "truncated checkpoint": (dict(ckpt="truncated"), ["truncated.pth"]),
    "ResNet checkpoint": (dict(ckpt="resnet"), ["resnet.pth", "another architecture"]),
    "annotation file not COCO": (dict(ann="not_coco"), ["not_coco.json", "not a COCO annotation file"]),
    "empty dataset": (dict(ann="empty"), ["empty.json", "no images"]),
    "undecodable image": (dict(img_dir="bad_img_dir"), ["bad_images/000000000001.png", "cannot decode"]),
}


@pytest.mark.parametrize("case", list(TEST_PY_CASES))
def test_tools_test_bad_input(case, bad, quant_files, capsys):
    spec, fragments = TEST_PY_CASES[case]
    paths = {**bad, **quant_files}
    extra = [paths.get(v, v) for v in spec.get("extra", ())]
    argv = test_argv(paths, *extra, ann=spec.get("ann", "ann"), img_dir=spec.get("img_dir", "img_dir"),
                     ckpt=spec.get("ckpt", "ckpt"))
    before = tree(bad["work"])
    assert_one_error(call_main(test_tool.main, argv, capsys), *fragments)
    assert tree(bad["work"]) == before
