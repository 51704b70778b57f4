"""One splice of an ONNX graph: indexed once, edited, then written back in one step.

A rewrite rule (``export/rules/``) reads the index (``graph_index.Graph``, with shape inference)
and records its edits here: nodes replaced by a list of new nodes at the same place, nodes removed,
initializers added once per name or overwritten in place, contrib-op domains used. ``commit``
rebuilds the node list in graph order (so it stays topological), appends the new initializers and,
where nodes were replaced, drops what nothing reads any more (the replaced nodes' inputs).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .graph_index import Graph, index_graph

MS_DOMAIN = "com.microsoft"  # onnxruntime's contrib ops (MatMulIntegerToFloat)


class GraphEdit:
    """The pending edits of one model: made against one index, applied by ``commit``."""

    def __init__(self, proto: onnx.ModelProto) -> None:
        self.proto = proto
        self.graph: Graph = index_graph(proto)
        self._names = {i.name for i in proto.graph.initializer}
        self._new_inits: list[onnx.TensorProto] = []
        self._replaced: dict[int, list[onnx.NodeProto]] = {}
        self._written: set[str] = set()
        self._domains: dict[str, int] = {}

    def add_initializer(self, name: str, value: np.ndarray) -> str:
        """A new initializer `name` holding `value` (the first value given for a name wins); its name."""
        if name not in self._names:
            self._names.add(name)
            self._new_inits.append(numpy_helper.from_array(value, name))
        return name

    def set_initializer(self, name: str, value: np.ndarray) -> None:
        """Overwrite the existing initializer `name` in place (same position, new type and values)."""
        init = next(i for i in self.proto.graph.initializer if i.name == name)
        init.CopyFrom(numpy_helper.from_array(value, name))

    def replace(self, node: onnx.NodeProto, nodes: list[onnx.NodeProto]) -> None:
        """Put `nodes` where `node` stands; they must write whatever of its outputs is still read."""
        self._replaced[id(node)] = list(nodes)
        self._written.update(o for n in nodes for o in n.output)

    def writes(self, name: str) -> bool:
        """Whether a node added by this edit already writes `name` (a value several matches share)."""
        return name in self._written

    def remove(self, node: onnx.NodeProto) -> None:
        """Drop `node`; a replacement must write its outputs."""
        self._replaced[id(node)] = []

    def use_domain(self, domain: str, version: int = 1) -> None:
        """Import the op set `domain` (a contrib op of a new node) if the model does not yet."""
        self._domains.setdefault(domain, version)

    def commit(self) -> None:
        """Apply the edits to the model: node list, initializers, op sets, then `remove_unused`."""
        graph = self.proto.graph
        if self._replaced:
            nodes = [new for node in self.graph.nodes for new in self._replaced.get(id(node), [node])]
            del graph.node[:]
            graph.node.extend(nodes)
        graph.initializer.extend(self._new_inits)
        for domain, version in self._domains.items():
            if not any(o.domain == domain for o in self.proto.opset_import):
                self.proto.opset_import.append(helper.make_opsetid(domain, version))
        if self._replaced:
            remove_unused(self.proto)


def remove_unused(proto: onnx.ModelProto) -> None:
    """Drop nodes and initializers nothing reads any more (a replaced conv's DequantizeLinear)."""
    graph = proto.graph
    needed = {o.name for o in graph.output} | _names_read_by_subgraphs(graph)
    keep = []
    for node in reversed(list(graph.node)):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(i for i in node.input if i)
    del graph.node[:]
    graph.node.extend(reversed(keep))
    inits = [i for i in graph.initializer if i.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(inits)


def _names_read_by_subgraphs(graph: onnx.GraphProto) -> set[str]:
    """Every value name a node of a subgraph (If/Loop bodies) reads: outer values stay alive."""
    names: set[str] = set()
    for node in graph.node:
        for attr in node.attribute:
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                names.update(i for n in sub.node for i in n.input if i)
                names |= _names_read_by_subgraphs(sub)
    return names
