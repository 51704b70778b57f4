"""The one safe way to (re)place an output folder: checked first, built beside it, renamed into place.

Rules, so that nothing a user owns is ever deleted:
- the path is resolved first; `.`, `..`, the current folder, any folder above it and `/` are refused;
- an existing folder is replaced (with --force) only if it is an artifact this tool wrote: its
  `repq.json` says so and it holds nothing but the files the tool writes there;
- the new folder is written as a hidden sibling `.<name>.tmp<PID>` and renamed into place once
  complete; only the tool's own files of the old folder are deleted;
- a hidden sibling left by a run that was killed (its PID no longer runs) is recognised and removed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import UserError
from .files import deferred_signals, temporary_name

MANIFEST = "repq.json"
MANIFEST_FORMAT = "repq-export-artifact"
TOOL_FILES = frozenset({MANIFEST, "model.onnx", "quant.pth", "model.engine"})
TOOL_FILE_PATTERN = re.compile(r"parity_[a-z0-9]+\.json")  # written into an artifact by the demo
_TMP_PATTERN = re.compile(r"\.(?P<name>.+)\.(?:tmp|old)(?P<pid>\d+)")


_PARTIAL = re.compile(r"\.?(?P<name>.+?)(?:\.tmp\d*|\.\d+\.tmp)")  # a half-written file of a killed run


def written_by_tool(name: str, named: frozenset[str] = frozenset()) -> bool:
    """Whether a file name is one this tool writes into an artifact folder (or its half-written form);
    `named`: the folder's own file names from its manifest (``named_in_manifest``)."""
    partial = _PARTIAL.fullmatch(name)
    name = partial["name"] if partial else name
    return name in TOOL_FILES or name in named or bool(TOOL_FILE_PATTERN.fullmatch(name))


def named_in_manifest(folder: Path) -> frozenset[str]:
    """The ONNX file (a deploy config's ``save_file``) and engine that a folder's repq.json names."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        onnx_file = str(manifest["onnx"]["file"])
    except (OSError, ValueError, KeyError, TypeError):
        return frozenset()
    if Path(onnx_file).name != onnx_file or not onnx_file.endswith(".onnx"):
        return frozenset()  # not a plain name in this folder: nothing to claim
    return frozenset({onnx_file, onnx_file[: -len(".onnx")] + ".engine"})


def is_artifact(folder: Path) -> bool:
    """Whether `folder` holds a repq.json written by this tool."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and manifest.get("format") == MANIFEST_FORMAT


def _refuse_dangerous(out: Path, option: str) -> Path:
    """The resolved `out`; UserError if it is `/`, the current folder or one above it."""
    resolved = out.resolve()
    cwd = Path.cwd().resolve()
    if out.name in ("", ".", "..") or resolved == resolved.parent:
        raise UserError(f"{option} {out}: name a new folder, not '.', '..' or '/'")
    if resolved == cwd or resolved in cwd.parents:
        raise UserError(f"{option} {out}: is the current folder or one above it; name a new folder")
    return resolved


def check_replaceable(out: Path, force: bool, option: str = "--out") -> None:
    """Refuse an existing `out` unless --force was given and it is an artifact holding only tool files."""
    resolved = _refuse_dangerous(out, option)
    if not resolved.exists() and not resolved.is_symlink():
        return
    if resolved.is_symlink() or not resolved.is_dir():
        raise UserError(f"{option} {out}: is a file, not a folder; name a new folder")
    if not is_artifact(resolved):
        raise UserError(f"{option} {out}: exists and is not an artifact written by repq-export (no {MANIFEST}); "
                        "it is left alone: name a new folder")
    named = named_in_manifest(resolved)
    foreign = sorted(p.name for p in resolved.iterdir() if not (written_by_tool(p.name, named) and p.is_file()))
    if foreign:
        raise UserError(f"{option} {out}: holds files repq-export did not write ({', '.join(foreign[:3])}); "
                        "it is left alone: move them or name a new folder")
    if not force:
        raise UserError(f"{option} {out}: already exists (use --force to replace it)")


def check_out_dir(out: Path, force: bool, make_parent: bool = False, option: str = "--out") -> None:
    """Every check on an output folder that can run before any work: replaceable, parent writable.

    With `make_parent` (a default output path) a missing parent folder is created, after the other checks."""
    check_replaceable(out, force, option)
    parent = out.resolve().parent
    if make_parent and not parent.exists() and parent.parent.is_dir():
        parent.mkdir()
    if not parent.is_dir():
        raise UserError(f"{option} {out}: parent folder {parent} does not exist")
    # a real probe, not os.access: root passes that check on read-only mounts such as /proc
    try:
        os.rmdir(tempfile.mkdtemp(prefix=f".{out.name}.probe", dir=parent))
    except OSError as exc:
        raise UserError(f"{option} {out}: cannot create a folder in {parent} ({exc.strerror or exc})") from None


def _pid_alive(pid: int) -> bool:
    """Whether a process with this id runs (a permission error means it does, as another user's)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(out: Path) -> list[Path]:
    """Remove `.<name>.tmp<PID>` (and `.old<PID>`) siblings of `out` whose process is gone and that hold only tool files."""
    parent, removed = out.resolve().parent, []
    if not parent.is_dir():
        return removed
    for entry in parent.iterdir():
        match = _TMP_PATTERN.fullmatch(entry.name)
        if not match or match["name"] != out.name or not entry.is_dir() or entry.is_symlink():
            continue
        pid = int(match["pid"])
        if pid == os.getpid() or _pid_alive(pid):
            continue
        named = named_in_manifest(entry)
        if all(written_by_tool(p.name, named) for p in entry.iterdir()):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def _clear_tool_files(folder: Path) -> None:
    """Delete the tool's own files of an old artifact folder, then the folder if it is empty."""
    named = named_in_manifest(folder)
    for entry in folder.iterdir():
        if written_by_tool(entry.name, named) and entry.is_file():
            entry.unlink()
    try:
        folder.rmdir()
    except OSError:
        pass  # a file appeared meanwhile: leave it (and the folder)


@contextmanager
def staged_dir(out: Path, force: bool, option: str = "--out") -> Iterator[Path]:
    """A fresh hidden sibling of `out` to write into; renamed to `out` when the block ends normally.

    The sibling is removed on any error, Ctrl-C or SIGTERM (see commands.common.run_command)."""
    check_replaceable(out, force, option)
    remove_stale_temporaries(out)
    resolved = out.resolve()
    tmp = temporary_name(resolved)
    shutil.rmtree(tmp, ignore_errors=True)
    try:  # the folder is made inside the block whose `finally` removes it: a signal can land right after mkdir
        try:
            tmp.mkdir()
        except OSError as exc:
            raise UserError(f"{option} {out}: cannot create the folder ({exc.strerror or exc})") from None
        yield tmp
        check_replaceable(out, force, option)  # again: the folder may have changed during the work
        with deferred_signals():  # the old artifact is moved aside and the new one moved in as one step
            old = None
            if resolved.exists():
                old = resolved.with_name(f".{resolved.name}.old{os.getpid()}")
                if old.is_dir():
                    _clear_tool_files(old)
                os.replace(resolved, old)
            try:
                os.replace(tmp, resolved)
            except OSError:
                if old is not None:
                    os.replace(old, resolved)  # the previous artifact goes back under its name
                raise
            if old is not None:
                _clear_tool_files(old)
    except OSError as exc:  # disk full, folder removed under us: nothing is written
        raise UserError(f"{option} {out}: cannot write it ({exc.strerror or exc})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
