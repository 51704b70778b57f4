"""Rule `split_uint8_weights`: a product on 8-bit (uint8, per-column zero point) weight codes as two
on int8 halves, codes - zp = 16 hi + lo, derived in the graph from the stored codes; the same linear
bit for bit where every product is a float32 value. A product it must leave says why."""

from __future__ import annotations

import numpy as np
from onnx import numpy_helper

from repq_export.export.graph_index import index_graph
from repq_export.export.ort_check import check_onnxruntime_form
from repq_export.export.rules.integer_matmul import INTEGER_MATMUL
from repq_export.export.rules.rule import apply_rule, apply_rules
from repq_export.export.rules.split_uint8_weights import SPLIT_UINT8_WEIGHTS

from rule_graphs import linear_graph, run, zero_rows

RULES = [INTEGER_MATMUL, SPLIT_UINT8_WEIGHTS]


def test_split_uint8_weights_keeps_the_linear_on_two_narrow_int8_halves() -> None:
    before, after = linear_graph(8), linear_graph(8)
    assert apply_rules(after, RULES) == {"integer_matmul": 1, "split_uint8_weights": 1}
    graph = index_graph(after)
    mms = [n for n in graph.nodes if n.op_type == "MatMulIntegerToFloat"]
    hi, lo = (graph.folded(n.input[1]) for n in mms)
    signed = graph.constant("w").astype(np.int64) - graph.constant("wzp").astype(np.int64)
    assert hi.dtype == lo.dtype == np.int8 and np.array_equal(16 * hi.astype(np.int64) + lo, signed)
    assert max(np.abs(hi).max(), np.abs(lo).max()) <= 16 and np.abs(signed).max() > 128
    assert check_onnxruntime_form(after) == []
    # the file keeps the uint8 codes once, no int8 copies
    assert [i.name for i in after.graph.initializer if len(i.dims) == 2] == ["w"]
    y0, y1 = run(before, after)
    assert np.abs(y0 - y1).max() <= 1e-5 * np.abs(y0).max()


def test_split_uint8_weights_gives_the_float_linear_bit_for_bit() -> None:
    before, after = linear_graph(8, exact=True), linear_graph(8, exact=True)
    assert apply_rules(after, RULES) == {"integer_matmul": 1, "split_uint8_weights": 1}
    y0, y1 = run(before, after)
    assert np.abs(y0).max() > 0 and np.array_equal(y0, y1)


def test_split_uint8_weights_leaves_int8_weights_and_says_why() -> None:
    """Below 8 bits the weight codes are int8 already: one narrow product, nothing to split."""
    model = linear_graph(4)
    apply_rule(model, INTEGER_MATMUL)
    graph = index_graph(model)
    (match,) = SPLIT_UINT8_WEIGHTS.pattern(graph)
    assert SPLIT_UINT8_WEIGHTS.check(graph, match) == "the weight codes are not uint8 (one narrow product already)"
    assert apply_rule(model, SPLIT_UINT8_WEIGHTS) == 0


def test_a_split_into_wide_halves_breaks_the_saturation_rule() -> None:
    """The same split by 256 instead of 16 leaves lo up to 255 codes wide: the u8s8 rule must see
    it through the folded expression."""
    model = linear_graph(8)
    apply_rules(model, RULES)
    sixteen = next(i for i in model.graph.initializer if i.name.endswith("/sixteen"))
    sixteen.CopyFrom(numpy_helper.from_array(np.array(256, np.int16), sixteen.name))
    assert {i.rule for i in check_onnxruntime_form(model)} == {"u8s8-saturation"}


def test_split_uint8_weights_runs_on_zero_rows() -> None:
    before, after = zero_rows(linear_graph(8)), zero_rows(linear_graph(8))
    assert apply_rules(after, RULES) == {"integer_matmul": 1, "split_uint8_weights": 1}
    y0, y1 = run(before, after, x=np.zeros((0, 5, 16), np.float32))
    assert y0.shape == y1.shape == (0, 5, 8)
