"""``torch.load`` that never runs code from the file.

``weights_only=True`` first; where a checkpoint's metadata pickles objects of other libraries
(mmengine's message hub and its HistoryBuffers, numpy arrays and scalars, an optimizer's state in
an mmdetection 3.x training checkpoint), every global the pickle names is registered as an inert
placeholder and the load is retried, so the weights still load and nothing of those libraries is
imported or called. A pickle that names a function that runs commands or code (os.system,
subprocess, eval, ...) is refused before torch reads it, with what to do instead.
"""

from __future__ import annotations

import io
import pickle
import pickletools
import warnings
import zipfile
from _compat_pickle import IMPORT_MAPPING as PY2_MODULES, NAME_MAPPING as PY2_NAMES  # what pickle itself imports
from pathlib import Path
from typing import Any

import torch
from torch._utils import IMPORT_MAPPING, NAME_MAPPING  # the Python 2 -> 3 names torch's loader looks up

from repq_export.errors import UserError
from repq_export.resources import MAX_PICKLE_BYTES
from repq_export.models.checkpoint_checks import sniff_file


# Modules, and builtins, whose functions only serve to run commands or code: no checkpoint has a
# reason to name one, so a pickle that does is refused outright, naming it (torch itself blocks
# os, sys, posix and nt; the others would only become inert placeholders, but are refused the same).
REFUSED_MODULES = ("os", "posix", "nt", "sys", "subprocess", "runpy", "importlib", "ctypes", "pty", "shutil",
                   "socket", "code", "codeop", "webbrowser", "multiprocessing", "signal", "pickle", "_pickle",
                   "marshal", "types")
REFUSED_BUILTINS = ("eval", "exec", "compile", "__import__", "open", "breakpoint", "input", "globals", "locals",
                    "vars", "setattr", "delattr", "exit", "quit", "help")
RESAVE_HINT = ("if you trust it, load it in your own code and save only the weights: "
               "torch.save({'state_dict': model.state_dict()}, 'weights.pth')")


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

    A pickle naming a function that runs commands or code is refused, naming that function.
    """
    kind = sniff_file(path)
    if kind != "torch":
        raise UserError(f"{path}: not a PyTorch checkpoint ({kind})")
    try:
        pairs = _pickled_globals(path)
    except Exception:
        pairs = None  # not readable as pickles: torch.load says why below
    names = None if pairs is None else {_torch_name(m, n) for m, n in pairs}
    if pairs:
        _refuse_code(path, {_python3_name(m, n) for m, n in pairs} | names | {f"{m}.{n}" for m, n in pairs})
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols on stderr: not the user's business
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first_error = exc
    except Exception as exc:  # zip reader, EOF, bad magic number: not a (whole) torch file
        raise UserError(f"{path}: not a PyTorch checkpoint, or truncated ({_reason(exc)})") from None
    if names is None:
        raise UserError(f"{path}: not a PyTorch checkpoint, or truncated ({_reason(first_error)})") from None
    try:
        with torch.serialization.safe_globals([_placeholder(n) for n in sorted(names)]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(f"{path}: refused: the file's pickle holds what this tool does not read "
                        f"({_reason(exc)}); {RESAVE_HINT}") from None


def _refuse_code(path: Path, names: set[str]) -> None:
    """Refuse a checkpoint whose pickle names a function that runs commands or code, naming it."""
    bad = sorted(n for n in names if n.split(".")[0] in REFUSED_MODULES
                 or n in {f"builtins.{b}" for b in REFUSED_BUILTINS})
    if bad:
        spelled = [f"os.{n.split('.', 1)[1]}" if n.startswith(("posix.", "nt.")) else n for n in bad]
        shown = ", ".join(spelled[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise UserError(f"{path}: refused: its pickle would call {shown} while loading (a checkpoint holds "
                        f"only data, and this tool never runs code from one); {RESAVE_HINT}")


def _python3_name(module: str, name: str) -> str:
    """'module.name' that Python's own unpickler would import: protocol-2 pickles spell Python 3's
    names the Python 2 way ('__builtin__', 'commands' for subprocess)."""
    if (module, name) in PY2_NAMES:
        module, name = PY2_NAMES[(module, name)]
    elif module in PY2_MODULES:
        module = PY2_MODULES[module]
    return f"{module}.{name}"


def _torch_name(module: str, name: str) -> str:
    """'module.name' as torch's weights-only loader looks it up (its own, shorter, table of those names)."""
    if (module, name) in NAME_MAPPING:
        module, name = NAME_MAPPING[(module, name)]
    elif module in IMPORT_MAPPING:
        module = IMPORT_MAPPING[module]
    return f"{module}.{name}"


def _pickled_globals(path: Path) -> set[tuple[str, str]]:
    """(module, name) as written, of every GLOBAL opcode in the checkpoint's pickle(s), found without loading."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            entries = [i for i in archive.infolist() if i.filename.endswith("data.pkl")]
            if any(i.file_size > MAX_PICKLE_BYTES for i in entries):  # zipfile reads no more than this size
                raise ValueError("data.pkl is larger than any checkpoint's pickle")
            streams = [io.BytesIO(archive.read(i)) for i in entries]
        if not streams:
            raise ValueError("no data.pkl in the archive")
        pickles = [(s, 1) for s in streams]
    else:  # legacy format: magic number, protocol, sys info, then the object, in a row
        pickles = [(open(path, "rb"), 4)]
    names: set[tuple[str, str]] = set()
    for stream, count in pickles:
        with stream:
            for _ in range(count):
                for opcode, arg, _pos in pickletools.genops(stream):
                    if opcode.name == "GLOBAL":
                        module, _, name = str(arg).partition(" ")
                        names.add((module, name))
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
