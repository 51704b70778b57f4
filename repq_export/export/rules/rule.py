"""A graph rewrite rule and the driver that applies rules in order.

A rule is three plain functions over one index of the graph (``graph_edit.GraphEdit``):

- ``pattern(graph)``: every candidate of the rule's shape, in graph order (cheap, structural);
- ``check(graph, match)``: why this candidate must not be rewritten, or None where it may be;
- ``rewrite(edit, match)``: record the replacement in the edit (nodes, initializers, op sets).

``apply_rule`` indexes the graph once, rewrites every candidate its check passes and commits the
splice once, so a rule sees the graph as the previous rule left it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import onnx

from ..graph_edit import GraphEdit
from ..graph_index import Graph

M = TypeVar("M")


@dataclass(frozen=True)
class Rule(Generic[M]):
    """One rewrite: a name, what it matches, why a match must be left, and how it is rewritten."""

    name: str
    pattern: Callable[[Graph], list[M]]
    check: Callable[[Graph, M], str | None]
    rewrite: Callable[[GraphEdit, M], None]


def apply_rule(proto: onnx.ModelProto, rule: Rule[Any]) -> int:
    """Rewrite every match of `rule` in `proto` whose check passes, in one splice; returns how many."""
    edit = GraphEdit(proto)
    matches = [m for m in rule.pattern(edit.graph) if rule.check(edit.graph, m) is None]
    for match in matches:
        rule.rewrite(edit, match)
    if matches:
        edit.commit()
    return len(matches)


def apply_rules(proto: onnx.ModelProto, rules: Sequence[Rule[Any]]) -> dict[str, int]:
    """Apply `rules` in order (each on the graph the previous one left); matches rewritten by rule name."""
    return {rule.name: apply_rule(proto, rule) for rule in rules}

