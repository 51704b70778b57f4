"""Bad data through the command line: annotation files, ONNX files for `check`, categories, degenerate
calibration and an edited artifact. Each ends in one `error:` line and exit code 2 (test_bad_input.py
has the output folders, signals, configs and checkpoints)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from cli_helpers import TINY_MASK, call_main, one_error, tiny_artifact
from repq_export import cli
from repq_export.commands import parity_tool, test_tool


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    return tiny_artifact(tmp_path_factory)


def coco_with(art, tmp_path: Path, edit) -> Path:
    data = json.loads(art.ann.read_text())
    edit(data)
    path = tmp_path / "edited.json"
    path.write_text(json.dumps(data))
    return path


ANNOTATIONS = {
    "bbox is a string": (lambda d: d["annotations"][0].update(bbox="10 20 30 40"), ["bbox", "4 numbers"]),
    "bbox of 3 numbers": (lambda d: d["annotations"][0].update(bbox=[1, 2, 3]), ["bbox"]),
    "bbox with NaN": (lambda d: d["annotations"][0].update(bbox=[1, 2, float("nan"), 4]), ["bbox"]),
    "segmentation is a number": (lambda d: d["annotations"][0].update(segmentation=5), ["segmentation"]),
    "polygon of strings": (lambda d: d["annotations"][0].update(segmentation=[["a"] * 6]), ["segmentation"]),
    "unknown image id": (lambda d: d["annotations"][0].update(image_id=99999), ["image_id", "99999"]),
    "unknown category": (lambda d: d["annotations"][0].update(category_id=777), ["category_id", "777"]),
    "file_name with ..": (lambda d: d["images"][0].update(file_name="../../etc/passwd"), ["outside", "passwd"]),
    "absolute file_name": (lambda d: d["images"][0].update(file_name="/etc/passwd"), ["outside"]),
    "image id is a list": (lambda d: d["images"][0].update(id=[1]), ["images[0].id", "integer id"]),
}


@pytest.mark.parametrize("case", list(ANNOTATIONS))
def test_bad_annotation_in_test_and_parity_check(art, tmp_path, case, capsys):
    edit, fragments = ANNOTATIONS[case]
    ann = coco_with(art, tmp_path, edit)
    one_error(call_main(test_tool.main, [TINY_MASK, art.ckpt, "--ann", ann, "--img-dir", art.img_dir, "--quiet"],
                        capsys), "edited.json", *fragments)
    one_error(call_main(parity_tool.main, [art.path, "--ann", ann, "--img-dir", art.img_dir, "--quiet"], capsys),
              "edited.json", *fragments)


# ------------------------------------------------------------------ 5. repq-export check


def tiny_graph(path: Path, inputs: list[str]) -> Path:
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])
    node = helper.make_node("Relu" if len(inputs) == 1 else "Add", inputs, ["y"])
    graph = helper.make_graph([node], "g", [x], [y])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_check_judges_what_it_is_given(art, tmp_path, capsys):
    (tmp_path / "empty.onnx").write_bytes(b"")
    one_error(call_main(cli.main, ["check", tmp_path / "empty.onnx"], capsys), "not an ONNX model", "empty")
    (tmp_path / "junk.onnx").write_bytes(b"\x00\x01 not protobuf at all " * 10)
    one_error(call_main(cli.main, ["check", tmp_path / "junk.onnx"], capsys), "not an ONNX model")
    undefined = tiny_graph(tmp_path / "undefined.onnx", ["x", "nowhere"])
    one_error(call_main(cli.main, ["check", undefined], capsys), "onnx.checker", "nowhere")
    result = call_main(cli.main, ["check", tiny_graph(tmp_path / "float.onnx", ["x"])], capsys)
    assert result.rc == 1 and "not-quantized" in result.out and "Traceback" not in result.err
    result = call_main(cli.main, ["check", art.path], capsys)
    assert result.rc == 0 and "no issues found" in result.out, result.out


# ------------------------------------------------------------------ 6. parity check: categories


def test_parity_check_refuses_other_categories(art, tmp_path, capsys):
    def add_category(data):
        data["categories"].append({"id": 999, "name": "extra", "supercategory": "x"})

    ann = coco_with(art, tmp_path, add_category)
    one_error(call_main(parity_tool.main, [art.path, "--ann", ann, "--img-dir", art.img_dir, "--quiet"], capsys),
              "5 categories", "4 classes")


# ------------------------------------------------------------------ 9. degenerate calibration


def test_constant_calibration_input_is_refused(art):
    """A quantizer that saw one constant gets the floor scale: refused with one line, on every CPU alike."""
    from repq_export.errors import UserError
    from repq_export.models.checkpoint import load_checkpoint
    from repq_export.quant.calibrate import quantize

    det, _ = load_checkpoint(art.ckpt, TINY_MASK)
    img, img_hw = torch.full((1, 3, 192, 256), 0.25), torch.tensor([192.0, 256.0])
    with torch.no_grad():
        assert det(img, img_hw)[0].shape[0] > 0  # the float model does find boxes here
    with pytest.raises(UserError, match="saw only one constant value") as info:
        quantize(det, [(img, img_hw)], 4, 4, progress=False)
    assert "patch_embed" in str(info.value)


# ------------------------------------------------------------------ 10. an edited quantizer table


def test_edited_quantizer_table_is_refused(art, tmp_path, capsys):
    edited = Path(shutil.copytree(art.path, tmp_path / "edited"))
    manifest = json.loads((edited / "repq.json").read_text())
    row = next(r for r in manifest["quantizers"] if r["granularity"] == "per_tensor")
    row["scale"] *= 2
    (edited / "repq.json").write_text(json.dumps(manifest))
    image = next(art.img_dir.iterdir())
    for backend in ("ort", "quant"):
        one_error(call_main(cli.main, ["predict", edited, image, "--backend", backend, "--save", tmp_path / "p.png"],
                            capsys), "repq.json", row["name"], "differs from quant.pth")
    one_error(call_main(parity_tool.main, [edited, "--ann", art.ann, "--img-dir", art.img_dir, "--quiet"], capsys),
              "differs from quant.pth")
    assert not (tmp_path / "p.png").exists()
    result = call_main(cli.main, ["predict", art.path, image, "--save", tmp_path / "p.png"], capsys)
    assert result.rc == 0 and (tmp_path / "p.png").is_file(), result.err
