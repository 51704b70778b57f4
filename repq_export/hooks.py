"""Forward hooks for the length of a ``with`` block: how calibration, the parity tiers and the error
reports look at (or nudge) quantizer inputs without changing the model's code."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

from torch import nn


@contextmanager
def hooked(hooks: Iterable[tuple[nn.Module, Callable]], pre: bool = False) -> Iterator[None]:
    """Register each ``(module, fn)`` as a forward hook (``pre``: a forward pre-hook) and remove
    them all when the block ends, also on an exception."""
    handles = []
    try:
        for module, fn in hooks:
            handles.append(module.register_forward_pre_hook(fn) if pre else module.register_forward_hook(fn))
        yield
    finally:
        for handle in handles:
            handle.remove()
