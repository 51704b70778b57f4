"""`export/graph_edit`: one splice of a graph (replace, remove, add initializers, op sets, then drop
what nothing reads), and `remove_unused` keeping what a subgraph reads."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from repq_export.export.graph_edit import GraphEdit, remove_unused

from rule_graphs import run


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


def _chain() -> onnx.ModelProto:
    """x -> Mul(x, two) -> Neg -> Abs -> y."""
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "two"], ["m"], name="mul"), helper.make_node("Neg", ["m"], ["n"], name="neg"),
         helper.make_node("Abs", ["n"], ["y"], name="abs")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])],
        [numpy_helper.from_array(np.float32(2), "two")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])


def test_a_splice_replaces_in_place_adds_once_and_drops_what_nothing_reads() -> None:
    """Mul(x, two) replaced by Mul(x, three) at its place; the second value given for "three" is
    ignored; "two", read by nothing now, is dropped; a removed node's output is written by the
    replacement of another."""
    model = _chain()
    edit = GraphEdit(model)
    mul, neg, _ = edit.graph.nodes
    three = edit.add_initializer("three", np.float32(3))
    assert edit.add_initializer("three", np.float32(4)) == "three"
    edit.replace(mul, [helper.make_node("Mul", ["x", three], ["m3"], name="mul3"),
                       helper.make_node("Neg", ["m3"], ["n"], name="neg3")])
    edit.remove(neg)
    assert edit.writes("n") and not edit.writes("m")
    edit.use_domain("com.microsoft")
    edit.commit()
    assert [n.name for n in model.graph.node] == ["mul3", "neg3", "abs"]
    assert [i.name for i in model.graph.initializer] == ["three"]
    assert [o.domain for o in model.opset_import] == ["", "com.microsoft"]
    (y,) = run(model, x=np.array([1, -2, 3], np.float32))
    assert np.array_equal(y, [3, 6, 9])


def test_a_splice_that_only_overwrites_an_initializer_keeps_every_node() -> None:
    """set_initializer changes values in place; no node is replaced, so nothing is dropped (even
    the dead one)."""
    model = _chain()
    model.graph.node.append(helper.make_node("Sin", ["x"], ["dead"], name="dead"))
    edit = GraphEdit(model)
    edit.set_initializer("two", np.float32(5))
    edit.commit()
    assert [n.name for n in model.graph.node] == ["mul", "neg", "abs", "dead"]
    (y,) = run(model, x=np.array([1, -2, 3], np.float32))
    assert np.array_equal(y, [5, 10, 15])
