"""The one home of the output rules: every command that writes checks its outputs here first.

Folders this tool writes whole (an artifact, a Triton model repository, the demo's synthetic set):
- the path is resolved first; `.`, `..`, the current folder, any folder above it and `/` are refused,
  and so is a symbolic link;
- an existing empty folder is taken as it is; any other is replaced (with --force) only if this tool
  wrote it: its manifest carries the format marker, every file in it is one the manifest records under
  the tool's own names, and each file's bytes still match the sha256 recorded; anything else leaves the
  whole folder alone;
- the new folder is written as a hidden sibling `.<name>.tmp<PID>` and renamed into place once
  complete; on any error (a full disk too), Ctrl-C or SIGTERM the sibling is removed and the old
  folder kept; only the recorded, unchanged files of the old folder are deleted;
- a hidden sibling left by a run that was killed (its PID no longer runs) and holding only the
  tool's file names is recognised and removed.

Every output, file or folder: it is never one of the command's own inputs (the same path, or a
symbolic or hard link to it), never inside a folder the command reads, and a folder to be replaced
never holds an input.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError
from .files import deferred_signals, file_sha256, temporary_name, write_error

MAX_MANIFEST_BYTES = 64 << 20
SHA256 = re.compile(r"[0-9a-f]{64}")
_TMP_PATTERN = re.compile(r"\.(?P<name>.+)\.(?:tmp|old)(?P<pid>\d+)")
_PARTIAL = re.compile(r"\.?(?P<name>.+?)(?:\.tmp\d*|\.\d+\.tmp)")  # a half-written file of a killed run


@dataclass(frozen=True)
class FolderKind:
    """A kind of folder this tool writes whole: what it is called, the manifest that records its files,
    and which relative paths its files and folders may have."""

    what: str  # in messages: "an artifact"
    manifest: str | None  # file that records what the tool wrote; None: never replaced, only made
    marker: str | None  # the manifest's "format" value
    records: Callable[[dict], dict[str, str]]  # manifest -> {relative path: sha256}; ValueError if malformed
    file_pattern: re.Pattern  # relative paths of the files the tool writes there
    dir_pattern: re.Pattern | None = None  # relative paths of the folders it makes there (None: flat)
    parse: Callable[[str], object] = json.loads  # the manifest's text -> its JSON; ValueError or UserError if bad

    def own_file(self, rel: str) -> bool:
        """Whether a relative path is one of this kind's file names (or its half-written form)."""
        head, _, name = rel.rpartition("/")
        partial = _PARTIAL.fullmatch(name)
        name = partial["name"] if partial else name
        rel = f"{head}/{name}" if head else name
        return rel == self.manifest or bool(self.file_pattern.fullmatch(rel))

    def own_dir(self, rel: str) -> bool:
        """Whether a relative folder path is one the tool makes in this kind of folder."""
        return self.dir_pattern is not None and bool(self.dir_pattern.fullmatch(rel))


def checked_records(records: object, pattern: re.Pattern, where: str) -> dict[str, str]:
    """`records` as {relative path: sha256}, each path one of the tool's names; ValueError otherwise."""
    if not isinstance(records, dict):
        raise ValueError(f"{where} is not a record of files")
    for rel, digest in records.items():
        if not isinstance(rel, str) or not pattern.fullmatch(rel):
            raise ValueError(f"{where} names {str(rel)[:80]!r}, not a file name repq-export writes")
        if not isinstance(digest, str) or not SHA256.fullmatch(digest):
            raise ValueError(f"{where} has no sha256 for {rel}")
    return dict(records)


def read_manifest_file(path: Path, parse: Callable[[str], object] = json.loads) -> dict | None:
    """A manifest's JSON object (``parse`` reads its text), or None where it is not a plain, readable, small
    JSON object file."""
    try:
        if path.is_symlink() or not path.is_file() or path.stat().st_size > MAX_MANIFEST_BYTES:
            return None
        manifest = parse(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UserError):
        return None
    return manifest if isinstance(manifest, dict) else None


def owned_files(folder: Path, kind: FolderKind, label: str) -> list[str]:
    """The relative paths of `folder` that --force may delete: all of its files, each recorded by its manifest
    under the tool's own names with bytes unchanged; UserError (nothing deleted) where any is not."""
    if kind.manifest is None:
        raise UserError(f"{label}: exists already (not made by this run); it is left alone: move it away")
    manifest = read_manifest_file(folder / kind.manifest, kind.parse)
    if manifest is None or manifest.get("format") != kind.marker:
        raise UserError(f"{label}: exists and is not {kind.what} written by repq-export (no {kind.manifest}); "
                        "it is left alone: name a new folder")
    try:
        records = kind.records(manifest)
    except ValueError as exc:
        raise UserError(f"{label}: its {kind.manifest} {exc}; it is left alone: name a new folder") from None
    foreign, changed, owned = [], [], [kind.manifest]
    for root, dirs, names in os.walk(folder):
        base = Path(root).relative_to(folder)
        for d in list(dirs):
            rel = (base / d).as_posix()
            if (Path(root) / d).is_symlink() or not kind.own_dir(rel):
                foreign.append(rel)
                dirs.remove(d)
        for name in names:
            rel, path = (base / name).as_posix(), Path(root) / name
            if rel == kind.manifest and not path.is_symlink():
                continue
            if rel not in records or path.is_symlink() or not path.is_file():
                foreign.append(rel)
            elif file_sha256(path) != records[rel]:
                changed.append(rel)
            else:
                owned.append(rel)
    if foreign:
        raise UserError(f"{label}: holds files repq-export did not write ({', '.join(sorted(foreign)[:3])}); "
                        "it is left alone: move them or name a new folder")
    if changed:
        raise UserError(f"{label}: {', '.join(sorted(changed)[:3])} changed since repq-export wrote it (sha256 "
                        f"differs from {kind.manifest}); it is left alone: move it or name a new folder")
    return owned


def _refuse_dangerous(out: Path, option: str) -> Path:
    """The resolved `out`; UserError if it is `/`, the current folder or one above it."""
    resolved = out.resolve()
    cwd = Path.cwd().resolve()
    if out.name in ("", ".", "..") or resolved == resolved.parent:
        raise UserError(f"{option} {out}: name a new folder, not '.', '..' or '/'")
    if resolved == cwd or resolved in cwd.parents:
        raise UserError(f"{option} {out}: is the current folder or one above it; name a new folder")
    return resolved


def check_replaceable(out: Path, force: bool, option: str = "--out", *, kind: FolderKind) -> list[str]:
    """Refuse an existing `out` unless --force was given and every file in it is one this tool wrote, unchanged;
    the files --force may delete (none where `out` does not exist)."""
    resolved = _refuse_dangerous(out, option)
    if out.is_symlink():
        raise UserError(f"{option} {out}: is a symbolic link; name a new folder")
    if not resolved.exists():
        return []
    if not resolved.is_dir():
        raise UserError(f"{option} {out}: is a file, not a folder; name a new folder")
    if not any(resolved.iterdir()):
        return []  # an empty folder (made for the output) holds nothing to lose
    owned = owned_files(resolved, kind, f"{option} {out}")
    if not force:
        raise UserError(f"{option} {out}: already exists (use --force to replace it)")
    return owned


def parent_problem(path: Path) -> str | None:
    """Why files cannot be made beside `path`: a folder above it that is a file, or one that does not exist."""
    parent = path.resolve().parent
    for folder in (parent, *parent.parents):
        if folder.exists() and not folder.is_dir():
            return f"{folder} is a file, not a folder"
        if folder.is_dir():
            break
    return None if parent.is_dir() else f"parent folder {parent} does not exist"


def check_out_dir(out: Path, force: bool, make_parent: bool = False, option: str = "--out", *,
                  kind: FolderKind) -> None:
    """Every check on an output folder that can run before any work: replaceable, parent writable.

    With `make_parent` (a default output path) a missing parent folder is created, after the other checks."""
    problem = parent_problem(out)
    if problem and "is a file" in problem:
        raise UserError(f"{option} {out}: {problem}")
    check_replaceable(out, force, option, kind=kind)
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


def check_output_file(path: Path | None, option: str) -> None:
    """Refuse an output file that cannot be written before any work: a folder, a symbolic link to a folder,
    a folder above it that is a file or does not exist."""
    if path is None:
        return
    if path.is_dir():
        raise UserError(f"{option} {path}: is a folder; give a file name")
    problem = parent_problem(path)
    if problem:
        raise UserError(f"{option} {path}: {problem}")


def _same(a: Path, b: Path) -> bool:
    """Whether two paths name the same file or folder (also through symbolic or hard links)."""
    try:
        return os.path.samefile(a, b)
    except OSError:  # one does not exist (yet)
        return a.resolve() == b.resolve()


def check_not_an_input(outputs: Mapping[str, Path | None], inputs: Mapping[str, Path | None],
                       replaced: frozenset[str] = frozenset()) -> None:
    """Refuse an output that is one of the command's inputs (same path, symbolic or hard link), lies inside
    an input folder, or is named twice; an output folder in `replaced` must not hold an input either."""
    given = [(option, path) for option, path in outputs.items() if path is not None]
    for i, (option, out) in enumerate(given):
        for other, path in given[:i]:
            if _same(out, path):
                raise UserError(f"{option} {out}: is also {other}; give each output its own name")
        target = out.resolve()
        for source, path in inputs.items():
            if path is None:
                continue
            if _same(out, path):
                raise UserError(f"{option} {out}: is {source} {path}, an input of this command; writing it "
                                "would destroy it: name another output")
            folder = path.resolve()
            if folder.is_dir() and folder in target.parents:
                raise UserError(f"{option} {out}: is inside {source} {path}, a folder this command reads; "
                                "write it elsewhere")
            if option in replaced and target in folder.parents:
                raise UserError(f"{option} {out}: holds {source} {path}, an input of this command; name a "
                                "new folder")


def _pid_alive(pid: int) -> bool:
    """Whether a process with this id runs (a permission error means it does, as another user's)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _only_own_names(folder: Path, kind: FolderKind) -> bool:
    """Whether everything under `folder` has one of the tool's names for `kind` (no links, nothing else)."""
    for root, dirs, names in os.walk(folder):
        base = Path(root).relative_to(folder)
        for d in dirs:
            if (Path(root) / d).is_symlink() or not kind.own_dir((base / d).as_posix()):
                return False
        for name in names:
            path = Path(root) / name
            if path.is_symlink() or not path.is_file() or not kind.own_file((base / name).as_posix()):
                return False
    return True


def remove_stale_temporaries(out: Path, kind: FolderKind) -> list[Path]:
    """Remove `.<name>.tmp<PID>` (and `.old<PID>`) siblings of `out` whose process is gone and that hold
    only the tool's file names."""
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
        if _only_own_names(entry, kind):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def _delete_owned(folder: Path, owned: list[str]) -> None:
    """Delete the listed files of an old output folder, then its folders that are left empty."""
    for rel in owned:
        (folder / rel).unlink(missing_ok=True)
    for root, _, _ in sorted(os.walk(folder), key=lambda w: -len(w[0])):
        try:
            os.rmdir(root)
        except OSError:
            pass  # a file appeared meanwhile: leave it (and its folder)


@contextmanager
def staged_dir(out: Path, force: bool, option: str = "--out", *, kind: FolderKind) -> Iterator[Path]:
    """A fresh hidden sibling of `out` to write into; renamed to `out` when the block ends normally.

    The sibling is removed on any error, Ctrl-C or SIGTERM (see commands.common.run_command); an
    OSError (a full disk) becomes one line naming `out` and its disk."""
    check_replaceable(out, force, option, kind=kind)
    remove_stale_temporaries(out, kind)
    resolved = out.resolve()
    tmp = temporary_name(resolved)
    shutil.rmtree(tmp, ignore_errors=True)
    try:  # the folder is made inside the block whose `finally` removes it: a signal can land right after mkdir
        try:
            tmp.mkdir()
        except OSError as exc:
            raise UserError(f"{option} {out}: cannot create the folder ({exc.strerror or exc})") from None
        yield tmp
        owned = check_replaceable(out, force, option, kind=kind)  # again: the folder may have changed during the work
        with deferred_signals():  # the old folder is moved aside and the new one moved in as one step
            old = None
            if resolved.exists():
                old = resolved.with_name(f".{resolved.name}.old{os.getpid()}")
                if old.is_dir():
                    _delete_owned(old, owned_files(old, kind, str(old)))
                os.replace(resolved, old)
            try:
                os.replace(tmp, resolved)
            except OSError:
                if old is not None:
                    os.replace(old, resolved)  # the previous folder goes back under its name
                raise
            if old is not None:
                _delete_owned(old, owned)
    except OSError as exc:  # disk full, folder removed under us: nothing is written
        raise write_error(f"{option} {out}", resolved.parent, exc) from None
    except UserError as exc:  # a file that could not be written names the folder the user asked for
        if str(tmp) not in str(exc):
            raise
        raise UserError(str(exc).replace(str(tmp), str(out))) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
