"""Reading an mmdet config dict with messages that name the config path at fault."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from repq_export.errors import UserError


def get_field(d: Mapping, key: str, where: str, default: Any = ...) -> Any:
    """``d[key]`` or a UserError naming the config path that lacks it."""
    if not isinstance(d, Mapping):
        raise UserError(f"config: {where} must be a dict, got {type(d).__name__}")
    if key in d:
        return d[key]
    if default is ...:
        raise UserError(f"config: {where}.{key} is missing")
    return default


def expect_value(value: Any, allowed: Sequence[Any], what: str) -> None:
    """A UserError unless `value` is one of the supported `allowed` values."""
    if value not in allowed:
        raise UserError(f"config: {what} = {value!r} is not supported (supported: "
                        f"{', '.join(repr(a) for a in allowed)})")


def model_section(cfg: Mapping) -> Mapping:
    """The config's ``model`` dict."""
    model = get_field(cfg, "model", "config")
    if not isinstance(model, Mapping):
        raise UserError("config: model must be a dict")
    return model


def per_stage(value: Any, n: int) -> list:
    """A head given once (a dict) is shared by all ``n`` stages, as in mmdet's CascadeRoIHead."""
    return list(value) if isinstance(value, (list, tuple)) else [value] * n
