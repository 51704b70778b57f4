"""Rule `integer_matmul`: a float-output quantized MatMul (and its bias Add) as one
MatMulIntegerToFloat with the bias inside; the same linear, bit for bit where every product is a
float32 value, and on 0 rows. A MatMul it must leave says why."""

from __future__ import annotations

import numpy as np
from onnx import helper

from repq_export.export.graph_edit import MS_DOMAIN
from repq_export.export.graph_index import index_graph
from repq_export.export.ort_check import check_onnxruntime_form
from repq_export.export.rules.integer_matmul import INTEGER_MATMUL
from repq_export.export.rules.rule import apply_rule

from rule_graphs import linear_graph, run, zero_rows


def test_integer_matmul_computes_the_same_linear_with_the_bias_inside() -> None:
    before, after = linear_graph(), linear_graph()
    assert apply_rule(after, INTEGER_MATMUL) == 1
    assert [n.op_type for n in after.graph.node] == ["QuantizeLinear", "MatMulIntegerToFloat"]
    assert len(after.graph.node[1].input) == 7 and check_onnxruntime_form(after) == []
    assert any(o.domain == MS_DOMAIN for o in after.opset_import)
    y0, y1 = run(before, after)
    assert y0.shape == y1.shape == (2, 5, 8)
    assert np.abs(y0 - y1).max() <= 1e-6 * np.abs(y0).max()


def test_integer_matmul_gives_the_float_linear_bit_for_bit() -> None:
    """Power-of-two scales: the integer kernel with the bias inside equals `DQ -> MatMul -> Add`."""
    before, after = linear_graph(exact=True), linear_graph(exact=True)
    assert apply_rule(after, INTEGER_MATMUL) == 1
    y0, y1 = run(before, after)
    assert np.abs(y0).max() > 0 and np.array_equal(y0, y1)


def test_integer_matmul_leaves_a_graph_output_and_says_why() -> None:
    """A MatMul whose output the graph returns keeps its name and node: the check says so."""
    model = linear_graph()
    model.graph.output.append(helper.make_tensor_value_info("mm", 1, None))
    graph = index_graph(model)
    (match,) = INTEGER_MATMUL.pattern(graph)
    assert INTEGER_MATMUL.check(graph, match) == "its output is a graph output"
    before = model.SerializeToString()
    assert apply_rule(model, INTEGER_MATMUL) == 0 and model.SerializeToString() == before


def test_integer_matmul_leaves_a_weight_that_is_not_a_constant() -> None:
    """Weight codes computed at run time have no integer kernel here."""
    model = linear_graph()
    model.graph.node.insert(0, helper.make_node("Identity", ["w"], ["w_run"]))
    model.graph.node[3].input[0] = "w_run"  # the weight's DequantizeLinear reads it
    graph = index_graph(model)
    assert INTEGER_MATMUL.check(graph, INTEGER_MATMUL.pattern(graph)[0]) == \
        "the weight is not a constant 2-D tensor of codes"


def test_integer_matmul_runs_on_zero_rows() -> None:
    """The box head's fcs on 0 RoIs: the float linear's (0, 5, 8) output."""
    before, after = zero_rows(linear_graph()), zero_rows(linear_graph())
    assert apply_rule(after, INTEGER_MATMUL) == 1
    y0, y1 = run(before, after, x=np.zeros((0, 5, 16), np.float32))
    assert y0.shape == y1.shape == (0, 5, 8)
