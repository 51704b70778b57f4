"""Rule `widen_uint8_weights` (target CPU 'vnni'): 8-bit weight codes q and zero points zp stored as
int8 q - 128 and zp - 128 (the same q - zp), so one MatMulIntegerToFloat computes the linear, bit
for bit where every product is a float32 value. A weight another op reads says why it stays."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper

from repq_export.export.graph_index import index_graph
from repq_export.export.rules.integer_matmul import INTEGER_MATMUL
from repq_export.export.rules.rule import apply_rule, apply_rules
from repq_export.export.rules.split_uint8_weights import SPLIT_UINT8_WEIGHTS
from repq_export.export.rules.widen_uint8_weights import WIDEN_UINT8_WEIGHTS

from rule_graphs import linear_graph, run, zero_rows

RULES = [WIDEN_UINT8_WEIGHTS, INTEGER_MATMUL, SPLIT_UINT8_WEIGHTS]


def test_widen_uint8_weights_keeps_the_linear_on_one_full_range_int8_product() -> None:
    before, after = linear_graph(8), linear_graph(8)
    signed = index_graph(before).constant("w").astype(np.int64) - index_graph(before).constant("wzp").astype(np.int64)
    assert apply_rules(after, RULES) == {"widen_uint8_weights": 1, "integer_matmul": 1, "split_uint8_weights": 0}
    graph = index_graph(after)
    w, wzp = graph.constant("w"), graph.constant("wzp")
    assert w.dtype == wzp.dtype == np.int8
    assert np.array_equal(w.astype(np.int64) - wzp.astype(np.int64), signed) and np.abs(signed).max() > 128
    assert [n.op_type for n in after.graph.node] == ["QuantizeLinear", "MatMulIntegerToFloat"]
    y0, y1 = run(before, after)
    assert np.abs(y0 - y1).max() <= 1e-5 * np.abs(y0).max()


def test_widen_uint8_weights_gives_the_float_linear_bit_for_bit() -> None:
    """Widening alone (`DQ -> MatMul` on int8 codes) and then the integer kernel: exactly the float linear."""
    before, widened, integer = (linear_graph(8, exact=True) for _ in range(3))
    assert apply_rule(widened, WIDEN_UINT8_WEIGHTS) == 1
    assert apply_rules(integer, RULES[:2]) == {"widen_uint8_weights": 1, "integer_matmul": 1}
    y0, y1, y2 = run(before, widened, integer)
    assert np.abs(y0).max() > 0 and np.array_equal(y0, y1) and np.array_equal(y0, y2)


def test_widen_uint8_weights_leaves_codes_another_op_reads_and_says_why() -> None:
    """A weight tensor read by anything but its DequantizeLinear keeps its uint8 codes."""
    model = linear_graph(8)
    model.graph.node.append(helper.make_node("Cast", ["w"], ["w_float"], to=TensorProto.FLOAT))
    graph = index_graph(model)
    (match,) = WIDEN_UINT8_WEIGHTS.pattern(graph)
    assert WIDEN_UINT8_WEIGHTS.check(graph, match) == "Cast node 'w_float' reads 'w' otherwise"
    assert apply_rule(model, WIDEN_UINT8_WEIGHTS) == 0
    assert index_graph(model).constant("w").dtype == np.uint8


def test_widen_uint8_weights_leaves_a_zero_point_another_op_reads() -> None:
    model = linear_graph(8)
    model.graph.node.append(helper.make_node("Cast", ["wzp"], ["wzp_float"], to=TensorProto.FLOAT))
    graph = index_graph(model)
    assert "reads the zero point 'wzp'" in WIDEN_UINT8_WEIGHTS.check(graph, WIDEN_UINT8_WEIGHTS.pattern(graph)[0])
    assert apply_rule(model, WIDEN_UINT8_WEIGHTS) == 0


def test_widen_uint8_weights_runs_on_zero_rows() -> None:
    before, after = zero_rows(linear_graph(8)), zero_rows(linear_graph(8))
    assert apply_rules(after, RULES[:2]) == {"widen_uint8_weights": 1, "integer_matmul": 1}
    y0, y1 = run(before, after, x=np.zeros((0, 5, 16), np.float32))
    assert y0.shape == y1.shape == (0, 5, 8)
