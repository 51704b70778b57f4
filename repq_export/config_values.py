"""Checked reading of literal config values (dicts, lists, ints, fractions) parsed from a file.

Every problem is one ``UserError`` line naming the file and the key, so a config reader built on
``ValueReader`` (``deploy_config._Reader``) only says what each section may hold.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from repq_export.errors import UserError


def is_int(value: Any) -> bool:
    """An int that is not a bool (a config's True is no count)."""
    return isinstance(value, int) and not isinstance(value, bool)


def type_name(value: Any) -> str:
    """How an error line names the type of a config value ('a dict', 'an int', ...)."""
    return {dict: "a dict", list: "a list", str: "a string", bool: "a bool", int: "an int",
            float: "a float", type(None): "None"}.get(type(value), type(value).__name__)


def as_lists(value: Any) -> Any:
    """Tuples as lists, all the way down: the checks take either spelling of a sequence."""
    if isinstance(value, dict):
        return {k: as_lists(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [as_lists(v) for v in value]
    return value


class ValueReader:
    """Checks of single values of the config file `path`; `not_taken` maps keys refused on purpose
    to the reason."""

    not_taken: dict[str, str] = {}

    def __init__(self, path: Path):
        self.path = path

    def fail(self, key: str, problem: str) -> UserError:
        """The error naming the file and `key`."""
        return UserError(f"{self.path}: {key}: {problem}")

    def expect(self, key: str, value: Any, kind: str) -> Any:
        """`value` where it is of `kind` ('int', 'bool', 'str', 'dict', 'list', 'number')."""
        ok = {"int": is_int(value), "bool": isinstance(value, bool),
              "str": isinstance(value, str), "dict": isinstance(value, dict),
              "list": isinstance(value, list),
              "number": isinstance(value, (int, float)) and not isinstance(value, bool)}[kind]
        if not ok:
            wanted = {"int": "an int", "str": "a string"}.get(kind, f"a {kind}")
            raise self.fail(key, f"expected {wanted}, got {type_name(value)} {value!r}")
        return value

    def keys(self, key: str, value: Any, allowed: tuple[str, ...]) -> dict:
        """`value` where it is a dict of `allowed` keys only."""
        self.expect(key, value, "dict")
        for name in value:
            if name in self.not_taken:
                raise self.fail(f"{key}.{name}", self.not_taken[name])
            if name not in allowed:
                raise self.fail(f"{key}.{name}", f"unknown key (allowed: {', '.join(allowed)})")
        return value

    def one_of(self, key: str, value: Any, allowed: tuple[str, ...]) -> str:
        """`value` where it is one of the strings `allowed`."""
        if self.expect(key, value, "str") not in allowed:
            raise self.fail(key, f"must be one of {list(allowed)}, got {value!r}")
        return value

    def string_list(self, key: str, value: Any) -> tuple[str, ...]:
        """A list of strings, as a tuple."""
        self.expect(key, value, "list")
        for i, item in enumerate(value):
            self.expect(f"{key}[{i}]", item, "str")
        return tuple(value)

    def fraction(self, key: str, value: Any) -> float:
        """A number in [0, 1], as a float."""
        self.expect(key, value, "number")
        if not 0.0 <= value <= 1.0:
            raise self.fail(key, f"must lie in [0, 1], got {value}")
        return float(value)

    def positive_int(self, key: str, value: Any) -> int:
        """An int above 0."""
        self.expect(key, value, "int")
        if value <= 0:
            raise self.fail(key, f"must be positive, got {value}")
        return value
