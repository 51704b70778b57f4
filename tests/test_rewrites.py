"""`export/rewrites`: the onnxruntime form's rules in order, for target CPU 'any' and 'vnni', on a
conv followed by a linear; the target the rewritten graph needs. Each rule's own tests are in
tests/test_rule_*.py, the splice they share in tests/test_graph_edit.py."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from repq_export.deploy_config import TARGET_ANY, TARGET_VNNI
from repq_export.export.forms import set_target_cpu
from repq_export.export.ort_check import check_onnxruntime_form
from repq_export.export.rewrites import optimize_for_onnxruntime

from rule_graphs import linear_graph, run


def _products(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node if n.op_type in ("MatMul", "MatMulIntegerToFloat", "Conv")]


@pytest.mark.parametrize("bits, target, needed, products", [
    (4, TARGET_ANY, TARGET_ANY, 1), (4, TARGET_VNNI, TARGET_ANY, 1),
    (8, TARGET_ANY, TARGET_ANY, 2), (8, TARGET_VNNI, TARGET_VNNI, 1)])
def test_optimize_for_onnxruntime_puts_the_linear_on_integer_kernels(bits, target, needed, products) -> None:
    """4-bit: one product on every target; 8-bit: two int8 halves for 'any', one widened product
    for 'vnni', which is then the CPU the graph needs. Same linear within float rounding."""
    before, after = linear_graph(bits, exact=True), linear_graph(bits, exact=True)
    assert optimize_for_onnxruntime(after, target) == needed
    set_target_cpu(after, needed)  # as the exporter records it: `check` then knows the CPU
    assert _products(after) == ["MatMulIntegerToFloat"] * products and check_onnxruntime_form(after) == []
    y0, y1 = run(before, after)
    assert np.array_equal(y0, y1)


def test_optimize_for_onnxruntime_refuses_an_unknown_target() -> None:
    with pytest.raises(ValueError, match="unknown target_cpu 'avx512'"):
        optimize_for_onnxruntime(linear_graph(), "avx512")


def test_a_graph_without_quantized_products_is_left_byte_for_byte() -> None:
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
                              [numpy_helper.from_array(np.ones(2, np.float32), "unused")])
    model = helper.make_model(graph)
    before = model.SerializeToString()
    assert optimize_for_onnxruntime(model, TARGET_VNNI) == TARGET_ANY and model.SerializeToString() == before
