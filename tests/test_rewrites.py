"""`export/rewrites`: remove_unused keeps what a subgraph reads; integer_matmul and
split_uint8_weights keep the linear's values."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from repq_export.export.ort_check import check_onnxruntime_form
from repq_export.export.graph_index import index_graph
from repq_export.export.rewrites import integer_matmul, remove_unused, split_uint8_weights


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


def _run(*models: onnx.ModelProto) -> list[np.ndarray]:
    import onnxruntime as ort

    x = {"x": np.random.default_rng(1).normal(size=(2, 5, 16)).astype(np.float32)}
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
