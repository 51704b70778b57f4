"""``torch.load`` that never runs code from the file.

``weights_only=True`` first; where a checkpoint's metadata pickles objects of other libraries
(mmengine's message hub, numpy arrays), those classes are registered as inert placeholders and the
load is retried, so the weights still load. Modules torch blocks outright (os, sys, ...) still fail:
such a file is refused.
"""

from __future__ import annotations

import io
import pickle
import pickletools
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

from repq_export.errors import UserError
from repq_export.models.checkpoint_checks import sniff_file


class _Opaque:
    """Inert stand-in for an object of a class we will not import; keeps only its pickled data."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args

    def __setstate__(self, state: Any) -> None:
        self.state = state


def _placeholder(full_name: str) -> tuple[type, str]:
    """A distinct ``_Opaque`` subclass registered under ``full_name`` for the weights-only loader."""
    return type(f"Opaque[{full_name}]", (_Opaque,), {}), full_name


def safe_torch_load(path: Path) -> Any:
    """``torch.load(weights_only=True)``; on unknown globals, retry with inert placeholders.

    Modules torch blocks outright (os, sys, ...) still fail: such a file is refused.
    """
    kind = sniff_file(path)
    if kind != "torch":
        raise UserError(f"{path}: not a PyTorch checkpoint ({kind})")
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols on stderr: not the user's business
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first_error = exc
    except Exception as exc:  # zip reader, EOF, bad magic number: not a (whole) torch file
        raise UserError(f"{path}: not a PyTorch checkpoint, or truncated ({_reason(exc)})") from None
    try:
        names = _pickled_globals(path)
    except Exception:
        raise UserError(f"{path}: not a PyTorch checkpoint, or truncated "
                        f"({_reason(first_error)})") from None
    try:
        with torch.serialization.safe_globals([_placeholder(n) for n in sorted(names)]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(f"{path}: refused: cannot be loaded without running code from it "
                        f"({_reason(exc)})") from None


def _pickled_globals(path: Path) -> set[str]:
    """'module.name' of every GLOBAL opcode in the checkpoint's pickle(s), found without loading."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            streams = [io.BytesIO(archive.read(n)) for n in archive.namelist() if n.endswith("data.pkl")]
        if not streams:
            raise ValueError("no data.pkl in the archive")
        pickles = [(s, 1) for s in streams]
    else:  # legacy format: magic number, protocol, sys info, then the object, in a row
        pickles = [(open(path, "rb"), 4)]
    names: set[str] = set()
    for stream, count in pickles:
        with stream:
            for _ in range(count):
                for opcode, arg, _pos in pickletools.genops(stream):
                    if opcode.name == "GLOBAL":
                        names.add(str(arg).replace(" ", "."))
    return names


def _reason(exc: BaseException) -> str:
    """The informative line of a (often multi-paragraph) torch.load error, shortened."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip() and "weights_only" not in ln]
    pick = next((ln for ln in lines if "GLOBAL" in ln or "blocked" in ln), lines[0] if lines else "")
    pick = pick or type(exc).__name__
    if isinstance(exc, EOFError):
        return "the file ends early"
    if "zip archive" in pick:
        return "the zip archive is truncated or corrupt"
    if isinstance(exc, KeyError) or len(pick) < 12:  # pickle's bare "101": bytes that are not a pickle
        return f"unreadable bytes ({type(exc).__name__})"
    return pick if len(pick) <= 200 else pick[:197] + "..."
