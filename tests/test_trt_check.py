"""trt_check: each rule is broken by one small hand-built graph; one clean graph passes all."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from repq_export.export.trt_check import (
    Issue,
    TENSORRT_SUPPORTED_OPS,
    check_tensorrt_compat,
    format_report,
)

F = TensorProto.FLOAT


def make(nodes, inits, inputs, outputs, opset=17):
    graph = helper.make_graph(nodes, "g", inputs, outputs, [numpy_helper.from_array(a, n) for n, a in inits])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def by_rule(model, rule):
    return [i for i in check_tensorrt_compat(model) if i.rule == rule]


def conv_model(act_scale=0.02, act_zp=np.int8(0), w_scale=None, w_zp="int8", w_axis=0, opset=17,
               act_axis=None, consumer="Conv"):
    """img -> Q -> DQ -> Conv(DQ(int8 weight)) -> Relu: the TensorRT-form lowering (docs/numerics.md)."""
    rng = np.random.default_rng(0)
    w_scale = np.array([0.01, 0.02, 0.03, 0.04], np.float32) if w_scale is None else w_scale
    inits = [("act_scale", np.asarray(act_scale, np.float32)),
             ("w_q", rng.integers(-8, 8, (4, 3, 3, 3)).astype(np.int8)),
             ("w_scale", w_scale), ("bias", np.zeros(4, np.float32))]
    q_inputs, w_inputs = ["img", "act_scale"], ["w_q", "w_scale"]
    if act_zp is not None:
        inits.append(("act_zp", np.asarray(act_zp)))
        q_inputs.append("act_zp")
    if w_zp is not None:
        inits.append(("w_zp", np.zeros(w_scale.shape, np.int8)))
        w_inputs.append("w_zp")
    axis = {} if act_axis is None else {"axis": act_axis}
    nodes = [
        helper.make_node("QuantizeLinear", q_inputs, ["img_q"], name="act_q", **axis),
        helper.make_node("DequantizeLinear", ["img_q"] + q_inputs[1:], ["img_dq"], name="act_dq", **axis),
        helper.make_node("DequantizeLinear", w_inputs, ["w"], name="w_dq",
                         **({} if w_axis is None else {"axis": w_axis})),
    ]
    if consumer == "Conv":
        nodes.append(helper.make_node("Conv", ["img_dq", "w", "bias"], ["y"], name="conv", pads=[1, 1, 1, 1]))
    else:
        nodes.append(helper.make_node(consumer, ["img_dq"], ["y"], name="consumer"))
    nodes.append(helper.make_node("Relu", ["y"], ["out"], name="relu"))
    return make(nodes, inits, [helper.make_tensor_value_info("img", F, [1, 3, "h", "w"])],
                [helper.make_tensor_value_info("out", F, [1, 4, "h", "w"])], opset)


def clean_model():
    """Conv QDQ + residual Add + LayerNormalization + a QDQ MatMul reached through Transpose/Reshape,
    a dynamic-K TopK, NonMaxSuppression and RoiAlign: everything the detector uses, no issue."""
    base = conv_model()
    g = base.graph
    extra_inits = [
        ("ln_w", np.ones(4, np.float32)), ("ln_b", np.zeros(4, np.float32)),
        ("s", np.float32(0.05)), ("z", np.int8(0)), ("shape", np.array([1, -1, 4], np.int64)),
        ("m_q", np.ones((4, 8), np.int8)), ("m_scale", np.full(8, 0.1, np.float32)),
        ("m_zp", np.zeros(8, np.int8)), ("k_max", np.array([1000], np.int64)),
        ("nms_max", np.array([100], np.int64)), ("iou", np.array([0.5], np.float32)),
        ("score_thr", np.array([0.05], np.float32)), ("batch_idx", np.zeros(1, np.int64)),
        ("rois", np.array([[0, 0, 8, 8]], np.float32)),
    ]
    g.initializer.extend(numpy_helper.from_array(a, n) for n, a in extra_inits)
    g.node.extend([
        helper.make_node("Add", ["out", "y"], ["res"], name="residual"),
        helper.make_node("Transpose", ["res"], ["tokens"], name="to_tokens", perm=[0, 2, 3, 1]),
        helper.make_node("LayerNormalization", ["tokens", "ln_w", "ln_b"], ["ln"], name="ln", axis=-1),
        helper.make_node("QuantizeLinear", ["ln", "s", "z"], ["ln_q"], name="ln_q"),
        helper.make_node("DequantizeLinear", ["ln_q", "s", "z"], ["ln_dq"], name="ln_dq"),
        helper.make_node("Reshape", ["ln_dq", "shape"], ["flat"], name="flatten"),
        helper.make_node("DequantizeLinear", ["m_q", "m_scale", "m_zp"], ["m_w"], name="m_dq", axis=1),
        helper.make_node("MatMul", ["flat", "m_w"], ["mm"], name="fc"),
        helper.make_node("ReduceMax", ["mm"], ["score"], name="score", axes=[2], keepdims=0),
        helper.make_node("Shape", ["score"], ["score_shape"], name="shape_of"),
        helper.make_node("Gather", ["score_shape", "one"], ["n"], name="n", axis=0),
        helper.make_node("Min", ["n", "k_max"], ["k"], name="k"),
        helper.make_node("TopK", ["score", "k"], ["top", "top_idx"], name="topk", axis=1),
        helper.make_node("Slice", ["mm", "zero", "four", "two"], ["boxes"], name="boxes"),
        helper.make_node("Unsqueeze", ["top", "zero"], ["scores3"], name="scores3"),
        helper.make_node("NonMaxSuppression", ["boxes", "scores3", "nms_max", "iou", "score_thr"],
                         ["keep"], name="nms"),
        helper.make_node("RoiAlign", ["res", "rois", "batch_idx"], ["roi_feat"], name="roi_align",
                         output_height=2, output_width=2, sampling_ratio=0),
    ])
    g.initializer.extend([numpy_helper.from_array(np.array([1], np.int64), "one"),
                          numpy_helper.from_array(np.array([0], np.int64), "zero"),
                          numpy_helper.from_array(np.array([4], np.int64), "four"),
                          numpy_helper.from_array(np.array([2], np.int64), "two")])
    g.output.extend([helper.make_tensor_value_info("keep", TensorProto.INT64, ["n", 3]),
                     helper.make_tensor_value_info("roi_feat", F, [1, 4, 2, 2])])
    return base


def test_clean_graph_has_no_issues_and_is_a_valid_runnable_model():
    model = clean_model()
    onnx.checker.check_model(model, full_check=True)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    img = np.random.default_rng(1).standard_normal((1, 3, 8, 8)).astype(np.float32)
    keep, roi = session.run(["keep", "roi_feat"], {"img": img})
    assert keep.shape[1] == 3 and roi.shape == (1, 4, 2, 2)
    issues = check_tensorrt_compat(model)
    assert issues == [], format_report(issues)


def test_detector_ops_are_in_the_supported_list():
    for op in ("NonMaxSuppression", "RoiAlign", "TopK", "LayerNormalization", "Resize", "NonZero",
               "QuantizeLinear", "DequantizeLinear", "ConvTranspose", "Softmax"):
        assert op in TENSORRT_SUPPORTED_OPS
    assert "Unique" not in TENSORRT_SUPPORTED_OPS and "MatMulInteger" not in TENSORRT_SUPPORTED_OPS


def test_nonzero_zero_point_is_an_error_on_q_and_dq():
    issues = by_rule(conv_model(act_zp=np.int8(3)), "zero-point")
    assert {i.node for i in issues} == {"act_q", "act_dq"}
    assert all(i.severity == "error" and "symmetric" in i.message for i in issues)


def test_uint8_zero_point_is_an_error_even_when_zero():
    issues = by_rule(conv_model(act_zp=np.uint8(0)), "zero-point")
    assert {i.node for i in issues} == {"act_q", "act_dq"}
    assert all("UINT8" in i.message for i in issues)
    assert by_rule(conv_model(act_zp=np.uint8(0)), "qdq-type") == []  # reported once, as zero-point


def test_quantize_without_zero_point_means_uint8():
    issues = by_rule(conv_model(act_zp=None), "qdq-type")
    assert [(i.node, i.op) for i in issues] == [("act_q", "QuantizeLinear")]
    assert "uint8" in issues[0].message


def test_int16_quantization_type_is_an_error():
    issues = by_rule(conv_model(act_zp=np.int16(0), opset=21), "qdq-type")
    assert [i.node for i in issues] == ["act_q"] and "INT16" in issues[0].message


def test_int4_activation_is_an_error():
    model = conv_model(opset=21)
    zp = next(t for t in model.graph.initializer if t.name == "act_zp")
    zp.CopyFrom(helper.make_tensor("act_zp", TensorProto.INT4, [], [0]))
    issues = by_rule(model, "qdq-type")
    assert [i.node for i in issues] == ["act_q"] and "weight-only" in issues[0].message


def int4_matmul_model(block):
    """x[1,128] @ DQ(int4 weight [128, 4]) with block scales along axis 0."""
    rows = 128
    weight = helper.make_tensor("w_q", TensorProto.INT4, [rows, 4], [1, -1] * (rows * 2))
    scale = np.full((rows // block, 4), 0.1, np.float32)
    model = make(
        [helper.make_node("DequantizeLinear", ["w_q", "w_scale"], ["w"], name="w_dq", axis=0, block_size=block),
         helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
        [("w_scale", scale)], [helper.make_tensor_value_info("x", F, [1, rows])],
        [helper.make_tensor_value_info("y", F, [1, 4])], opset=21)
    model.graph.initializer.append(weight)
    return model


def test_int4_weights_need_block_64_or_128():
    assert check_tensorrt_compat(int4_matmul_model(64)) == []
    issues = by_rule(int4_matmul_model(32), "qdq-type")
    assert [i.node for i in issues] == ["w_dq"] and "block size 32" in issues[0].message


def test_per_channel_activation_scale_is_an_error():
    model = conv_model(act_scale=np.array([0.1, 0.2, 0.3], np.float32), act_zp=np.zeros(3, np.int8),
                       act_axis=1)
    issues = by_rule(model, "per-channel")
    assert {i.node for i in issues} == {"act_q", "act_dq"}
    assert "3 scales on an activation" in issues[0].message


def test_per_channel_weight_needs_explicit_axis():
    issues = by_rule(conv_model(w_axis=None), "per-channel")
    assert [i.node for i in issues] == ["w_dq"] and "axis 1" in issues[0].message
    assert by_rule(conv_model(w_axis=0), "per-channel") == []


@pytest.mark.parametrize("bad, text", [(0.0, "non-positive"), (-0.5, "non-positive"),
                                       (np.inf, "non-finite"), (np.nan, "non-finite")])
def test_bad_activation_scale(bad, text):
    issues = by_rule(conv_model(act_scale=bad), "scale")
    assert {i.node for i in issues} == {"act_q", "act_dq"} and text in issues[0].message


def test_bad_weight_channel_scale():
    issues = by_rule(conv_model(w_scale=np.array([0.1, 0.0, 0.1, 0.1], np.float32)), "scale")
    assert [i.node for i in issues] == ["w_dq"]


def test_scale_from_a_graph_input_is_not_constant():
    model = conv_model()
    model.graph.initializer.remove(next(t for t in model.graph.initializer if t.name == "act_scale"))
    model.graph.input.append(helper.make_tensor_value_info("act_scale", F, []))
    issues = by_rule(model, "scale")
    assert {i.node for i in issues} == {"act_q", "act_dq"} and "constant" in issues[0].message


def test_opset_below_13_and_layernorm_below_17():
    assert [i.node for i in by_rule(conv_model(opset=12), "opset")] == ["<model>"]
    ln = make([helper.make_node("LayerNormalization", ["x", "g"], ["y"], name="ln")],
              [("g", np.ones(4, np.float32))], [helper.make_tensor_value_info("x", F, [2, 4])],
              [helper.make_tensor_value_info("y", F, [2, 4])], opset=16)
    assert [i.node for i in by_rule(ln, "opset")] == ["ln"]


def test_unsupported_and_custom_ops():
    model = make([helper.make_node("Unique", ["x"], ["u"], name="uniq"),
                  helper.make_node("FusedGemm", ["x", "x"], ["f"], name="fused", domain="com.microsoft")],
                 [], [helper.make_tensor_value_info("x", F, [4])],
                 [helper.make_tensor_value_info("u", F, None), helper.make_tensor_value_info("f", F, None)])
    model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    issues = by_rule(model, "unsupported-op")
    assert {(i.node, i.op) for i in issues} == {("uniq", "Unique"), ("fused", "FusedGemm")}
    assert any("plugin" in i.message for i in issues)


def topk_model(k):
    return make([helper.make_node("TopK", ["x", "k"], ["v", "i"], name="topk")],
                [("k", np.array([k], np.int64))], [helper.make_tensor_value_info("x", F, [1, 5000])],
                [helper.make_tensor_value_info("v", F, None)])


def test_topk_constant_k_limit():
    assert by_rule(topk_model(3840), "topk") == []
    issues = by_rule(topk_model(3841), "topk")
    assert [i.node for i in issues] == ["topk"] and "3841 > 3840" in issues[0].message


def test_resize_cubic_is_an_error():
    model = make([helper.make_node("Resize", ["x", "", "scales"], ["y"], name="up", mode="cubic")],
                 [("scales", np.array([1, 1, 2, 2], np.float32))],
                 [helper.make_tensor_value_info("x", F, [1, 1, 4, 4])],
                 [helper.make_tensor_value_info("y", F, None)])
    issues = by_rule(model, "resize")
    assert [i.node for i in issues] == ["up"] and "mode='cubic'" in issues[0].message


def test_quantize_without_dequantize_is_an_error():
    model = conv_model()
    model.graph.node.append(helper.make_node("Cast", ["img_q"], ["leak"], name="cast", to=F))
    model.graph.output.append(helper.make_tensor_value_info("leak", F, None))
    issues = by_rule(model, "q-without-dq")
    assert [i.node for i in issues] == ["act_q"] and "cast (Cast)" in issues[0].message


def test_dq_feeding_a_non_fusing_op_is_a_placement_warning():
    issues = by_rule(conv_model(consumer="Sigmoid"), "qdq-placement")
    assert [(i.node, i.severity) for i in issues] == [("act_dq", "warning")]
    assert "consumer (Sigmoid)" in issues[0].message


def test_placement_follows_data_movement_ops():
    # act_dq -> Flatten -> Relu: the Flatten is looked through, the Relu is what is reported
    issues = by_rule(conv_model(consumer="Flatten"), "qdq-placement")
    assert [i.node for i in issues] == ["act_dq"] and issues[0].message.startswith("feeds relu (Relu)")


def test_decomposed_layernorm_is_a_warning():
    nodes = [helper.make_node("ReduceMean", ["x"], ["mean"], name="mean", axes=[-1]),
             helper.make_node("Sub", ["x", "mean"], ["d"], name="center"),
             helper.make_node("Pow", ["d", "two"], ["d2"], name="square"),
             helper.make_node("ReduceMean", ["d2"], ["var"], name="var", axes=[-1]),
             helper.make_node("Div", ["d", "var"], ["y"], name="norm")]
    model = make(nodes, [("two", np.float32(2))], [helper.make_tensor_value_info("x", F, [2, 4])],
                 [helper.make_tensor_value_info("y", F, None)])
    issues = by_rule(model, "layernorm-decomposed")
    assert [(i.node, i.severity) for i in issues] == [("center", "warning")]


def test_format_report():
    assert format_report([]) == "TensorRT compatibility: no issues found"
    report = format_report([Issue("n2", "Sigmoid", "qdq-placement", "slow", "warning"),
                            Issue("n1", "QuantizeLinear", "zero-point", "not zero")])
    lines = report.splitlines()
    assert lines[0] == "TensorRT compatibility: 1 error(s), 1 warning(s)"
    assert "error" in lines[1] and "[zero-point] n1 (QuantizeLinear): not zero" in lines[1]
    assert "warning" in lines[2] and "n2" in lines[2]
