"""`export/rewrites.remove_unused`: drops what nothing reads, keeps what a subgraph reads."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from repq_export.export.rewrites import remove_unused


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
