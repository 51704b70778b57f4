"""`export/rewrites`: remove_unused keeps what a subgraph reads; integer_conv keeps a conv's
values; integer_matmul, split_uint8_weights and widen_uint8_weights keep the linear's values."""

from __future__ import annotations

import numpy as np
import pytest
import onnx
from onnx import TensorProto, helper, numpy_helper

from repq_export.export.ort_check import check_onnxruntime_form
from repq_export.export.graph_index import index_graph
from repq_export.export.rewrites import integer_conv, integer_matmul, remove_unused, split_uint8_weights, \
    widen_uint8_weights


def test_remove_unused_keeps_values_read_inside_if_branches() -> None:
    branches = [helper.make_graph([helper.make_node("Identity", ["c"], [out])], out, [],
                                  [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)]) for out in ("a", "b")]
    graph = helper.make_graph(
        [helper.make_node("If", ["cond"], ["y"], then_branch=branches[0], else_branch=branches[1]),
         helper.make_node("Neg", ["d"], ["dead"])], "g",
        [helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.ones(2, np.float32), "c"), numpy_helper.from_array(np.ones(2, np.float32), "d")])
    model = helper.make_model(graph)
    remove_unused(model)
    assert [n.op_type for n in model.graph.node] == ["If"]
    assert [i.name for i in model.graph.initializer] == ["c"]


def _linear_graph(bits: int = 4) -> onnx.ModelProto:
    """x -> Q(uint8) -> DQ -> MatMul(DQ(weight codes, per-column scale)) -> Add(DQ(int32 bias)):
    int8 codes with zero point 0 below 8 bits, uint8 codes with per-column zero points at 8."""
    rng = np.random.default_rng(0)
    if bits == 8:
        weight = [numpy_helper.from_array(rng.integers(0, 256, (16, 8)).astype(np.uint8), "w"),
                  numpy_helper.from_array(rng.integers(0, 256, 8).astype(np.uint8), "wzp")]
    else:
        weight = [numpy_helper.from_array(rng.integers(-7, 8, (16, 8)).astype(np.int8), "w"),
                  numpy_helper.from_array(np.zeros(8, np.int8), "wzp")]
    inits = weight + [numpy_helper.from_array(np.float32(0.05), "xs"), numpy_helper.from_array(np.uint8(7), "xzp"),
             numpy_helper.from_array(rng.uniform(0.01, 0.02, 8).astype(np.float32), "ws"),
             numpy_helper.from_array(rng.integers(-500, 500, 8).astype(np.int32), "k"),
             numpy_helper.from_array(rng.uniform(1e-4, 2e-4, 8).astype(np.float32), "step"),
             numpy_helper.from_array(np.zeros(8, np.int32), "kzp")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xzp"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "xs", "xzp"], ["xd"]),
             helper.make_node("DequantizeLinear", ["w", "ws", "wzp"], ["wd"], axis=1),
             helper.make_node("MatMul", ["xd", "wd"], ["mm"], name="fc"),
             helper.make_node("DequantizeLinear", ["k", "step", "kzp"], ["b"], axis=0),
             helper.make_node("Add", ["mm", "b"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])


def _conv_graph(kernel: int, pad: int) -> onnx.ModelProto:
    """x -> Q(uint8, 4-bit Clip) -> DQ -> Conv(DQ(int8 weight codes, per-channel scale)) -> float
    output: the float-output conv `integer_conv` rewrites, on any batch, height and width."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.integers(-7, 8, (6, 8, kernel, kernel)).astype(np.int8), "w"),
             numpy_helper.from_array(np.zeros(6, np.int8), "wzp"),
             numpy_helper.from_array(rng.uniform(0.01, 0.02, 6).astype(np.float32), "ws"),
             numpy_helper.from_array(np.float32(0.05), "xs"), numpy_helper.from_array(np.uint8(7), "xzp"),
             numpy_helper.from_array(np.uint8(0), "lo"), numpy_helper.from_array(np.uint8(15), "hi")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xzp"], ["q0"]),
             helper.make_node("Clip", ["q0", "lo", "hi"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "xs", "xzp"], ["xd"]),
             helper.make_node("DequantizeLinear", ["w", "ws", "wzp"], ["wd"], axis=0),
             helper.make_node("Conv", ["xd", "wd"], ["y"], name="conv", pads=[pad] * 4)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8, "h", "w"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])


def test_integer_conv_computes_the_same_conv_on_every_image_of_a_batch() -> None:
    """im2col as one Gather of the taps' pixels + MatMulIntegerToFloat equals the float conv (to
    float rounding) for 3 images of an odd size, with and without padding: the mask head's convs
    run on a batch of RoIs."""
    x = np.random.default_rng(1).normal(size=(3, 8, 9, 11)).astype(np.float32)
    for kernel, pad in ((3, 1), (3, 0), (1, 0)):
        before, after = _conv_graph(kernel, pad), _conv_graph(kernel, pad)
        assert integer_conv(after) == 1 and integer_matmul(after) == 1
        ops = [n.op_type for n in after.graph.node]
        assert "Conv" not in ops and ops.count("MatMulIntegerToFloat") == 1
        assert ("Gather" in ops) == (kernel > 1) and check_onnxruntime_form(after) == []
        y0, y1 = _run(before, after, x=x)
        assert y0.shape == y1.shape == (3, 6, 9 - kernel + 1 + 2 * pad, 11 - kernel + 1 + 2 * pad)
        assert np.abs(y0 - y1).max() <= 1e-6 * np.abs(y0).max()


def _run(*models: onnx.ModelProto, x: np.ndarray | None = None) -> list[np.ndarray]:
    import onnxruntime as ort

    x = {"x": np.random.default_rng(1).normal(size=(2, 5, 16)).astype(np.float32) if x is None else x}
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return [ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"]).run(None, x)[0]
            for m in models]


def test_integer_matmul_computes_the_same_linear_with_the_bias_inside() -> None:
    before, after = _linear_graph(), _linear_graph()
    assert integer_matmul(after) == 1
    assert [n.op_type for n in after.graph.node] == ["QuantizeLinear", "MatMulIntegerToFloat"]
    assert len(after.graph.node[1].input) == 7 and check_onnxruntime_form(after) == []
    y0, y1 = _run(before, after)
    assert y0.shape == y1.shape == (2, 5, 8)
    assert np.abs(y0 - y1).max() <= 1e-6 * np.abs(y0).max()


def test_split_uint8_weights_keeps_the_linear_on_two_narrow_int8_halves() -> None:
    """8-bit weights: codes - zp = 16 hi + lo with |hi|, |lo| <= 16, derived in the graph from
    the stored uint8 codes; the two MatMulIntegerToFloat compute the same linear."""
    before, after = _linear_graph(8), _linear_graph(8)
    assert integer_matmul(after) == 1 and split_uint8_weights(after) == 1
    graph = index_graph(after)
    mms = [n for n in graph.nodes if n.op_type == "MatMulIntegerToFloat"]
    hi, lo = (graph.folded(n.input[1]) for n in mms)
    signed = graph.constant("w").astype(np.int64) - graph.constant("wzp").astype(np.int64)
    assert hi.dtype == lo.dtype == np.int8 and np.array_equal(16 * hi.astype(np.int64) + lo, signed)
    assert max(np.abs(hi).max(), np.abs(lo).max()) <= 16 and np.abs(signed).max() > 128
    assert check_onnxruntime_form(after) == []
    # the file keeps the uint8 codes once, no int8 copies
    assert [i.name for i in after.graph.initializer if len(i.dims) == 2] == ["w"]
    y0, y1 = _run(before, after)
    assert np.abs(y0 - y1).max() <= 1e-5 * np.abs(y0).max()


def test_a_split_into_wide_halves_breaks_the_saturation_rule() -> None:
    """The same split by 256 instead of 16 leaves lo up to 255 codes wide: the u8s8 rule must see
    it through the folded expression."""
    model = _linear_graph(8)
    integer_matmul(model)
    split_uint8_weights(model)
    sixteen = next(i for i in model.graph.initializer if i.name.endswith("/sixteen"))
    sixteen.CopyFrom(numpy_helper.from_array(np.array(256, np.int16), sixteen.name))
    assert {i.rule for i in check_onnxruntime_form(model)} == {"u8s8-saturation"}


def test_widen_uint8_weights_keeps_the_linear_on_one_full_range_int8_product() -> None:
    """Target CPU 'vnni': the uint8 codes q and zero points zp become int8 q - 128 and zp - 128
    (the same q - zp), so one MatMulIntegerToFloat with per-column zero points computes the linear."""
    before, after = _linear_graph(8), _linear_graph(8)
    signed = index_graph(before).constant("w").astype(np.int64) - index_graph(before).constant("wzp").astype(np.int64)
    assert widen_uint8_weights(after) == 1 and integer_matmul(after) == 1 and split_uint8_weights(after) == 0
    graph = index_graph(after)
    w, wzp = graph.constant("w"), graph.constant("wzp")
    assert w.dtype == wzp.dtype == np.int8
    assert np.array_equal(w.astype(np.int64) - wzp.astype(np.int64), signed) and np.abs(signed).max() > 128
    assert [n.op_type for n in after.graph.node] == ["QuantizeLinear", "MatMulIntegerToFloat"]
    y0, y1 = _run(before, after)
    assert np.abs(y0 - y1).max() <= 1e-5 * np.abs(y0).max()


def test_widen_uint8_weights_leaves_codes_another_op_reads() -> None:
    """A weight tensor read by anything but its DequantizeLinear keeps its uint8 codes."""
    model = _linear_graph(8)
    model.graph.node.append(helper.make_node("Cast", ["w"], ["w_float"], to=TensorProto.FLOAT))
    assert widen_uint8_weights(model) == 0
    assert index_graph(model).constant("w").dtype == np.uint8


def _shape_of(model: onnx.ModelProto, name: str) -> list[int] | None:
    """The constant shape a Reshape node named `name` reshapes to."""
    node = next(n for n in model.graph.node if n.name == name)
    value = index_graph(model).constant(node.input[1])
    return None if value is None else value.tolist()


def test_integer_conv_runs_on_a_batch_of_zero_images() -> None:
    """0 RoIs (an image without detections) give the mask head's convs a batch of 0: the rewritten
    conv gives the float conv's empty output, shape (0, K, H', W'), with and without padding, at
    onnxruntime's default level too. The im2col row width is written out (kh*kw*C)."""
    import onnxruntime as ort

    x = np.zeros((0, 8, 14, 14), np.float32)
    for kernel, pad in ((3, 1), (3, 0), (1, 0)):
        before, after = _conv_graph(kernel, pad), _conv_graph(kernel, pad)
        assert integer_conv(after) == 1 and integer_matmul(after) == 1
        if kernel > 1:
            assert _shape_of(after, "conv/im2col") == [0, 0, 0, kernel * kernel * 8]
        y0, y1 = _run(before, after, x=x)
        assert y0.shape == y1.shape == (0, 6, 14 - kernel + 1 + 2 * pad, 14 - kernel + 1 + 2 * pad)
        session = ort.InferenceSession(after.SerializeToString(), providers=["CPUExecutionProvider"])
        assert session.run(None, {"x": x})[0].shape == y0.shape


def test_the_old_im2col_shape_fails_on_zero_images_and_check_says_so() -> None:
    """The im2col's last Reshape as it was, (0, 0, 0, -1): onnxruntime cannot infer -1 from 0
    elements, and `check`'s empty-reshape rule names the node."""
    import onnxruntime as ort

    model = _conv_graph(3, 1)
    integer_conv(model)
    node = next(n for n in model.graph.node if n.name == "conv/im2col")
    model.graph.initializer.append(numpy_helper.from_array(np.array([0, 0, 0, -1], np.int64), "old_shape"))
    node.input[1] = "old_shape"
    assert [(i.rule, i.node) for i in check_onnxruntime_form(model)] == [("empty-reshape", "conv/im2col")]
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    assert session.run(None, {"x": np.zeros((2, 8, 5, 5), np.float32)})[0].shape == (2, 6, 5, 5)
    with pytest.raises(Exception, match="cannot be reshaped"):
        session.run(None, {"x": np.zeros((0, 8, 5, 5), np.float32)})


def _zero_rows(model: onnx.ModelProto) -> onnx.ModelProto:
    """The linear graph with a dynamic leading dim, fed 0 rows below (the box head's fcs on 0 RoIs)."""
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "rois"
    return model


def test_linear_rewrites_run_on_zero_rows() -> None:
    """integer_matmul (4-bit), split_uint8_weights (8-bit, target 'any') and widen_uint8_weights
    (8-bit, target 'vnni') each give the float linear's (0, 5, 8) output on 0 rows."""
    x = np.zeros((0, 5, 16), np.float32)
    cases = {"integer_matmul": (4, [integer_matmul]), "split": (8, [integer_matmul, split_uint8_weights]),
             "widen": (8, [widen_uint8_weights, integer_matmul])}
    for name, (bits, rewrites) in cases.items():
        before, after = _zero_rows(_linear_graph(bits)), _zero_rows(_linear_graph(bits))
        assert all(rewrite(after) == 1 for rewrite in rewrites), name
        y0, y1 = _run(before, after, x=x)
        assert y0.shape == y1.shape == (0, 5, 8), name
