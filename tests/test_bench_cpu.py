"""tools/bench_cpu.py's helpers: the int8-kernel count read from OpenVINO's runtime model, and the goal lines."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from repq_export.runtime.openvino_runner import openvino_available

from cli_helpers import REPO

sys.path.insert(0, str(REPO / "tools"))
import bench_cpu  # noqa: E402

OV_OK, OV_WHY = openvino_available()
needs_openvino = pytest.mark.skipif(not OV_OK, reason=OV_WHY)


def conv_graph(qdq: bool, path) -> str:
    """A 3x3 conv (8 -> 16 channels) on a 1x8x32x32 input; with `qdq`, int8 Q/DQ on its input and weight."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((16, 8, 3, 3)).astype(np.float32)
    inits = [numpy_helper.from_array(np.float32(0.05), "s"), numpy_helper.from_array(np.int8(0), "z")]
    if qdq:
        codes = np.clip(np.round(w / 0.05), -127, 127).astype(np.int8)
        inits += [numpy_helper.from_array(codes, "wq")]
        nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
                 helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"]),
                 helper.make_node("DequantizeLinear", ["wq", "s", "z"], ["wd"]),
                 helper.make_node("Conv", ["xd", "wd"], ["y"], pads=[1, 1, 1, 1])]
    else:
        inits += [numpy_helper.from_array(w, "wd")]
        nodes = [helper.make_node("Conv", ["x", "wd"], ["y"], pads=[1, 1, 1, 1])]
    graph = helper.make_graph(nodes, "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 32, 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16, 32, 32])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    out = path / f"conv_{'qdq' if qdq else 'float'}.onnx"
    out.write_bytes(model.SerializeToString())
    return str(out)


@needs_openvino
def test_int8_count_sees_the_qdq_conv_and_not_the_float_one(tmp_path):
    q = bench_cpu.ov_int8_layers(bench_cpu.ov_compile(conv_graph(True, tmp_path), "f32", 1))
    f = bench_cpu.ov_int8_layers(bench_cpu.ov_compile(conv_graph(False, tmp_path), "f32", 1))
    assert q == {"Convolution": "1/1"}
    assert f == {"Convolution": "0/1"}


@needs_openvino
def test_profile_sums_executed_layers(tmp_path):
    compiled = bench_cpu.ov_compile(conv_graph(True, tmp_path), "f32", 1, profile=True)
    prof = bench_cpu.ov_profile(compiled, {"x": np.ones((1, 8, 32, 32), np.float32)})
    assert any(key.startswith("Convolution") for key in prof) and all(us >= 0 for us in prof.values())


def lat(medians: dict[str, float]) -> dict:
    return {"models": {v: {"times": {"median": m}} for v, m in medians.items()}}


def test_goal_lines_pick_the_fastest_deployed_graph_and_judge_each_goal():
    lines, missed = bench_cpu.goal_lines({2: lat({"ort_float": 5.0, "ov_float_bf16": 2.6, "ort_w4": 2.4, "ov_w4": 1.9,
                                                  "ort_w8": 1.9, "ov_w8": 2.2})}, 2)
    text = "\n".join(lines)
    # W4A4: best is ov_w4 (1.9 s): 2.6/1.9 = 1.37x MET, 5.0/1.9 = 2.63x MET
    assert "W4A4 best = OpenVINO, our W4A4" in text and "1.37x (goal >= 1.3x) MET" in text and "2.63x" in text
    # W8A8: best is ort_w8 (1.9 s) too; ov_w8 slower is not chosen
    assert "W8A8 best = onnxruntime, our W8A8" in text
    assert missed == []
    lines, missed = bench_cpu.goal_lines({2: lat({"ort_float": 4.0, "ov_float_bf16": 2.0, "ov_w4": 1.8})}, 2)
    text = "\n".join(lines)
    assert "1.11x (goal >= 1.3x) MISSED" in text and "2.22x (goal >= 2.5x) MISSED" in text
    assert missed == [("ov_w4", "ov_float_bf16"), ("ov_w4", "ort_float")]
    assert "W8A8: no deployed graph was timed" in text


def test_quick_and_bits_parse():
    args = bench_cpu.parse_args(["--quick"])
    assert (args.bits, args.threads_list, args.runs, args.no_full_size) == ("4", "2", 2, True)
    assert bench_cpu.parse_ints("2, 1,2") == [1, 2]
    assert bench_cpu.main(["--bits", "5"]) == 2


def test_our_openvino_rows_compile_as_their_deploy_config_says_and_the_float_rows_both_ways():
    files = {"float": "f.onnx", "ov_w4": "w4.onnx", "ov_w8": "w8.onnx", "ov_w4_table": "t.onnx"}
    specs = bench_cpu.model_specs(files, experiments=True)
    assert specs["ov_w4"]["static"] and specs["ov_w8"]["static"] and specs["ov_w4_table"]["static"]
    assert not specs["ov_w4_dynamic"]["static"] and specs["ov_w4_dynamic"]["path"] == "w4.onnx"
    assert specs["ov_float_bf16_static"]["static"] and not specs["ov_float_bf16"]["static"]
    assert "ov_w4_dynamic" not in bench_cpu.model_specs(files, experiments=False)


def test_bench_openvino_graphs_reads_name_file_precision_and_shape_policy(tmp_path):
    import bench_openvino_graphs as bog

    assert bog.parse_graph("w4=a.onnx:static", tmp_path) == ("w4", str(tmp_path / "a.onnx"), "f32", True)
    assert bog.parse_graph("f=b.onnx@bf16", tmp_path) == ("f", str(tmp_path / "b.onnx"), "bf16", False)
    assert bog.parse_graph("g=c.onnx@bf16:static", tmp_path) == ("g", str(tmp_path / "c.onnx"), "bf16", True)
