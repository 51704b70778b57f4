"""Safe reader of mmdetection-style Python config files.

mmcv/mmengine *execute* a config file; a config handed to us by a user may come from anywhere,
so we parse it with ``ast`` and evaluate only a small, side-effect-free subset of Python:
literals, ``dict(...)`` calls (with ``**name``), lists, tuples, names bound earlier in the same
file, ``name[index]`` and simple arithmetic. ``_base_`` inheritance and ``_delete_=True`` follow
mmcv/mmengine. Everything else is a :class:`UserError` naming the file and line.
It turns a file into a plain dict and knows nothing of detectors: model configs
(``models/checkpoint.py``) and deploy configs (``deploy_config.py``) are both read through it.
"""

from __future__ import annotations

import ast
import operator
from pathlib import Path
from typing import Any, Callable

from repq_export.errors import UserError
from repq_export.files import read_input_text
from repq_export.resources import MAX_CONFIG_BYTES

BASE_KEY = "_base_"
DELETE_KEY = "_delete_"

_BINARY_OPS: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
    ast.LShift: operator.lshift,  # sizes such as 1 << 30
}
_UNARY_OPS: dict[type, Callable[[Any], Any]] = {
    ast.UAdd: operator.pos,
    ast.USub: operator.neg,
    ast.Not: operator.not_,
}
# A config is data, not a program: every value the evaluation makes is bounded, so that a hostile
# or broken file ends in one line instead of eating memory or time. Limits are far above any real
# mmdet config (which nests about 6 deep and holds a few thousand items).
_MAX_INT_BITS = 256  # |int| < 2**256
_MAX_LENGTH = 100_000  # items of one list/tuple/dict, characters of one string
_MAX_WEIGHT = 1_000_000  # items and characters of a value counted out in full (as JSON would)
_MAX_DEPTH = 100  # nesting of expressions and of values


def load_config(path: str | Path) -> dict:
    """Read an mmdet-style config file (with its ``_base_`` chain) into a plain dict."""
    return _load(Path(path), stack=())


def _load(path: Path, stack: tuple[Path, ...]) -> dict:
    """Load one file, then merge it over the merged dict of its bases."""
    resolved = path.resolve()
    if resolved in stack:
        chain = " -> ".join(p.name for p in (*stack, resolved))
        raise UserError(f"{path}: circular _base_ inheritance ({chain})")
    if path.suffix != ".py":
        raise UserError(f"{path}: only Python (.py) config files are supported")
    source = read_input_text(path, "config", None, MAX_CONFIG_BYTES)

    own = evaluate_source(source, path)
    bases = _base_paths(own.pop(BASE_KEY, None), path)
    merged: dict = {}
    for base in bases:
        if base.suffix == ".py" and not base.exists():
            raise UserError(f"{base}: config file not found (the _base_ of {path})")
        base_cfg = _load(base, (*stack, resolved))
        duplicates = sorted(set(merged) & set(base_cfg))
        if duplicates:
            raise UserError(f"{path}: keys {duplicates} are defined in more than one _base_ file")
        merged.update(base_cfg)
    return _strip_delete(_merge(own, merged))


def _base_paths(value: Any, path: Path) -> list[Path]:
    """Resolve the ``_base_`` value (str or list of str) relative to the config's folder."""
    if value is None:
        return []
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise UserError(f"{path}: _base_ must be a file name or a list of file names")
    for name in names:
        if "::" in name:
            raise UserError(f"{path}: package-scoped _base_ '{name}' is not supported; "
                            "use a path relative to the config")
    return [path.parent / name for name in names]


def _merge(child: dict, base: dict) -> dict:
    """Merge ``child`` over ``base`` like mmcv: dicts merge recursively unless ``_delete_=True``."""
    out = dict(base)
    for key, value in child.items():
        if isinstance(value, dict) and key in base and not value.get(DELETE_KEY, False):
            if not isinstance(base[key], dict):
                raise UserError(f"config key '{key}' is a dict in the child config but a "
                                f"{type(base[key]).__name__} in its base; set _delete_=True")
            out[key] = _merge({k: v for k, v in value.items() if k != DELETE_KEY}, base[key])
        else:
            out[key] = value
    return out


def _strip_delete(value: Any) -> Any:
    """Drop ``_delete_`` markers left over after merging (they are not model arguments)."""
    if isinstance(value, dict):
        return {k: _strip_delete(v) for k, v in value.items() if k != DELETE_KEY}
    if isinstance(value, list):
        return [_strip_delete(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_strip_delete(v) for v in value)
    return value


def evaluate_source(source: str, path: Path) -> dict:
    """Evaluate the top-level assignments of one config file, in order (no ``_base_`` handling):
    the one safe reader of every Python config, model configs and deploy configs alike."""
    try:
        tree = ast.parse(source, filename=str(path))
    except SyntaxError as exc:
        raise UserError(f"{path}:{exc.lineno}: invalid Python syntax ({exc.msg})") from None
    except (RecursionError, MemoryError):
        raise UserError(f"{path}: nested too deeply to parse (a config nests a few levels)") from None
    env: dict[str, Any] = {}
    sizes: dict[int, tuple[Any, int, int]] = {}
    for stmt in tree.body:
        if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant) \
                and isinstance(stmt.value.value, str):
            continue  # a docstring or a bare string
        if isinstance(stmt, ast.Pass):
            continue
        if not isinstance(stmt, ast.Assign):
            raise _unsupported(path, stmt, f"statement '{type(stmt).__name__}'")
        value = _Evaluator(path, env, sizes).eval(stmt.value)
        for target in stmt.targets:
            if not isinstance(target, ast.Name):
                raise _unsupported(path, target, "assignment target (only plain names)")
            env[target.id] = value
    return {k: v for k, v in env.items() if not k.startswith("__")}


def _unsupported(path: Path, node: ast.AST, what: str) -> UserError:
    """A UserError pointing at the offending line."""
    return UserError(f"{path}:{getattr(node, 'lineno', '?')}: unsupported {what} in config "
                     "(only literals, dict(), lists, tuples, names and arithmetic are allowed)")


class _Evaluator:
    """Evaluates one expression node against the names bound so far in the file."""

    def __init__(self, path: Path, env: dict[str, Any], sizes: dict[int, tuple[Any, int, int]] | None = None):
        self.path = path
        self.env = env
        self.sizes = {} if sizes is None else sizes  # id -> (container, depth, weight), shared by a file
        self.depth = 0

    def eval(self, node: ast.AST) -> Any:
        method = getattr(self, f"_eval_{type(node).__name__}", None)
        if method is None:
            raise _unsupported(self.path, node, f"expression '{type(node).__name__}'")
        self.depth += 1
        try:
            if self.depth > _MAX_DEPTH:
                raise self._fail(node, f"expression nested more than {_MAX_DEPTH} deep")
            value = method(node)
        finally:
            self.depth -= 1
        self._measure(node, value)
        return value

    def _measure(self, node: ast.AST, value: Any) -> tuple[int, int]:
        """(nesting depth, weight) of a value, refused past the limits; containers are memoised by id."""
        if isinstance(value, bool) or value is None or isinstance(value, float):
            return 0, 1
        if isinstance(value, int):
            if value.bit_length() > _MAX_INT_BITS:
                raise self._fail(node, f"integer of more than {_MAX_INT_BITS} bits")
            return 0, 1
        if isinstance(value, str):
            if len(value) > _MAX_LENGTH:
                raise self._fail(node, f"string longer than {_MAX_LENGTH} characters")
            return 0, max(1, len(value))
        if not isinstance(value, (list, tuple, dict)):
            return 0, 1
        known = self.sizes.get(id(value))
        if known is not None and known[0] is value:
            return known[1], known[2]
        if len(value) > _MAX_LENGTH:
            raise self._fail(node, f"{type(value).__name__} of more than {_MAX_LENGTH} items")
        items = [*value.keys(), *value.values()] if isinstance(value, dict) else value
        depth, weight = 0, 1
        for item in items:
            d, w = self._measure(node, item)
            depth, weight = max(depth, d + 1), weight + w
            if depth > _MAX_DEPTH:
                raise self._fail(node, f"value nested more than {_MAX_DEPTH} deep")
            if weight > _MAX_WEIGHT:
                raise self._fail(node, f"value larger than {_MAX_WEIGHT} items and characters in all")
        self.sizes[id(value)] = (value, depth, weight)
        return depth, weight

    def _fail(self, node: ast.AST, problem: str) -> UserError:
        return UserError(f"{self.path}:{getattr(node, 'lineno', '?')}: {problem}")

    def _eval_Constant(self, node: ast.Constant) -> Any:
        if isinstance(node.value, str) and "{{" in node.value and "}}" in node.value:
            raise self._fail(node, "'{{ ... }}' placeholders are not supported")
        if isinstance(node.value, bytes) or node.value is Ellipsis:
            raise _unsupported(self.path, node, "constant")
        return node.value

    def _eval_Name(self, node: ast.Name) -> Any:
        if node.id not in self.env:
            raise self._fail(node, f"name '{node.id}' is not defined earlier in this file")
        return self.env[node.id]

    def _eval_List(self, node: ast.List) -> list:
        return [self.eval(e) for e in node.elts]

    def _eval_Tuple(self, node: ast.Tuple) -> tuple:
        return tuple(self.eval(e) for e in node.elts)

    def _eval_Dict(self, node: ast.Dict) -> dict:
        out: dict = {}
        for key, value in zip(node.keys, node.values):
            if key is None:  # {**name}
                out.update(self._mapping(value))
            else:
                out[self._hashable(key)] = self.eval(value)
        return out

    def _eval_Call(self, node: ast.Call) -> dict:
        if not (isinstance(node.func, ast.Name) and node.func.id == "dict") or node.args:
            raise _unsupported(self.path, node, "call (only dict(key=value, **name))")
        out: dict = {}
        for kw in node.keywords:
            if kw.arg is None:
                out.update(self._mapping(kw.value))
            else:
                out[kw.arg] = self.eval(kw.value)
        return out

    def _eval_BinOp(self, node: ast.BinOp) -> Any:
        op = _BINARY_OPS.get(type(node.op))
        if op is None:
            raise _unsupported(self.path, node, f"operator '{type(node.op).__name__}'")
        left, right = self.eval(node.left), self.eval(node.right)
        self._check_size(node, op, left, right)
        try:
            return op(left, right)
        except Exception as exc:  # TypeError, ZeroDivisionError, ...
            raise self._fail(node, f"cannot evaluate expression ({exc})") from None

    def _eval_UnaryOp(self, node: ast.UnaryOp) -> Any:
        op = _UNARY_OPS.get(type(node.op))
        if op is None:
            raise _unsupported(self.path, node, f"operator '{type(node.op).__name__}'")
        try:
            return op(self.eval(node.operand))
        except TypeError as exc:
            raise self._fail(node, f"cannot evaluate expression ({exc})") from None

    def _eval_Subscript(self, node: ast.Subscript) -> Any:
        container, index = self.eval(node.value), self.eval(node.slice)
        try:
            return container[index]
        except (TypeError, KeyError, IndexError) as exc:
            raise self._fail(node, f"cannot evaluate subscript ({exc!r})") from None

    def _mapping(self, node: ast.AST) -> dict:
        value = self.eval(node)
        if not isinstance(value, dict):
            raise self._fail(node, "'**' needs a dict")
        return value

    def _hashable(self, node: ast.AST) -> Any:
        key = self.eval(node)
        if not isinstance(key, (str, int, float, bool, tuple)) and key is not None:
            raise self._fail(node, "dict keys must be constants")
        return key

    def _check_size(self, node: ast.AST, op: Callable, left: Any, right: Any) -> None:
        """Refuse arithmetic whose result would pass the limits, before computing it."""
        ints = all(isinstance(v, int) for v in (left, right))
        if op is operator.pow and ints and right > 0 and (abs(left) > 1) \
                and max(1, abs(left).bit_length() - 1) * right > _MAX_INT_BITS:
            raise self._fail(node, f"exponent too large (the power would pass {_MAX_INT_BITS} bits)")
        if op is operator.pow and isinstance(right, (int, float)) and not ints and abs(right) > _MAX_INT_BITS:
            raise self._fail(node, "exponent too large")
        if op is operator.lshift and ints and right > 0 and abs(left).bit_length() + right > _MAX_INT_BITS:
            raise self._fail(node, f"shift too large (the result would pass {_MAX_INT_BITS} bits)")
        if op is operator.mul and ints and left.bit_length() + right.bit_length() > _MAX_INT_BITS + 1:
            raise self._fail(node, f"product too large (more than {_MAX_INT_BITS} bits)")
        if op is operator.mul:
            counts = [v for v in (left, right) if isinstance(v, int) and not isinstance(v, bool)]
            seqs = [v for v in (left, right) if isinstance(v, (str, list, tuple))]
            if seqs and counts and len(seqs[0]) * max(counts[0], 0) > _MAX_LENGTH:
                raise self._fail(node, f"sequence repetition too large (over {_MAX_LENGTH} items or characters)")
            if seqs and counts and self._measure(node, seqs[0])[1] * max(counts[0], 0) > _MAX_WEIGHT:
                raise self._fail(node, f"sequence repetition too large (over {_MAX_WEIGHT} items and characters in all)")
        if op is operator.mod and isinstance(left, str):
            raise _unsupported(self.path, node, "string formatting with '%'")
