"""File helpers every stage shares: reading an input file only once it is known to be a regular file
within its budget (never blocking on a FIFO, never reading /dev/zero until memory runs out), content
hashes for manifests, and writing a file so that no half-written one is ever left under its real name
(also on Ctrl-C, SIGTERM or a full disk)."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import signal
import stat
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from repq_export.errors import UserError


def _label(path: str | Path, option: str | None) -> str:
    """How a message names an input: '--option PATH' where the option is known, else 'PATH'."""
    return f"{option} {path}" if option else str(path)


def _not_regular(mode: int) -> str | None:
    """What a file of this mode is, where it is not a regular file (None for a regular file)."""
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "is a folder"
    if stat.S_ISFIFO(mode):
        return "is a FIFO (named pipe)"
    if stat.S_ISCHR(mode):
        return "is a character device"
    if stat.S_ISBLK(mode):
        return "is a block device"
    if stat.S_ISSOCK(mode):
        return "is a socket"
    return "is a special file"


def check_input_file(path: str | Path, what: str, option: str | None = None, max_bytes: int | None = None,
                     hint: str = "") -> int:
    """Refuse a missing file, anything but a regular file, or one over `max_bytes` (saying `hint`); return its size."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise UserError(f"{_label(path, option)}: {what} file not found") from None
    except OSError as err:
        raise UserError(f"{_label(path, option)}: cannot read the {what} file ({err.strerror or err})") from None
    _check_stat(info, path, what, option, max_bytes, hint)
    return info.st_size


def _check_stat(info: os.stat_result, path: str | Path, what: str, option: str | None, max_bytes: int | None,
                hint: str = "") -> None:
    """The checks of check_input_file on a stat result (of a path or of an open descriptor)."""
    kind = _not_regular(info.st_mode)
    if kind is not None:
        raise UserError(f"{_label(path, option)}: {kind}, not a regular file: give the {what} file itself")
    if max_bytes is not None and info.st_size > max_bytes:
        raise UserError(f"{_label(path, option)}: {what} file of {info.st_size:,} bytes is over the limit of "
                        f"{max_bytes:,} bytes{hint}")


def read_input_bytes(path: str | Path, what: str, option: str | None = None, max_bytes: int | None = None,
                     hint: str = "") -> bytes:
    """The bytes of a regular input file within `max_bytes`, opened without blocking (a FIFO is refused,
    not waited on) and read no further than the budget (a file that grows meanwhile is refused too)."""
    check_input_file(path, what, option, max_bytes, hint)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as err:
        raise UserError(f"{_label(path, option)}: cannot read the {what} file ({err.strerror or err})") from None
    try:
        _check_stat(os.fstat(fd), path, what, option, max_bytes, hint)  # the file opened is the one checked
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read() if max_bytes is None else f.read(max_bytes + 1)
    except OSError as err:
        raise UserError(f"{_label(path, option)}: cannot read the {what} file ({err.strerror or err})") from None
    finally:
        os.close(fd)
    if max_bytes is not None and len(data) > max_bytes:
        raise UserError(f"{_label(path, option)}: {what} file grew over the limit of {max_bytes:,} bytes while read")
    return data


def read_input_text(path: str | Path, what: str, option: str | None = None, max_bytes: int | None = None) -> str:
    """A regular UTF-8 text input file within `max_bytes` (see read_input_bytes)."""
    data = read_input_bytes(path, what, option, max_bytes)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"{_label(path, option)}: not a {what} file (not UTF-8 text: byte {err.start})") from None


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in chunks (checkpoints are hundreds of MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def temporary_name(path: Path) -> Path:
    """The hidden sibling a file is written to before it is renamed into place: ``.NAME.tmpPID``."""
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


@contextmanager
def deferred_signals() -> Iterator[None]:
    """Hold SIGINT and SIGTERM until the block ends, so a few renames that belong together are not
    cut in half; a signal that came meanwhile is raised again, to its usual handler, right after.

    Done with Python handlers, not a signal mask: a mask holds only the calling thread, and torch's
    worker threads would still take a signal sent to the process."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    came: list[int] = []
    previous = {s: signal.signal(s, lambda signum, _frame: came.append(signum))
                for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if came:
            signal.raise_signal(came[0])


def write_atomically(path: str | Path, content: bytes | str | Callable[[Path], object]) -> Path:
    """Write `content` (bytes, text, or a function that writes a given path) to a temporary sibling,
    then rename it to `path`; a failure is one UserError line and leaves nothing behind."""
    path = Path(path)
    tmp = temporary_name(path)
    try:
        if isinstance(content, bytes):
            tmp.write_bytes(content)
        elif isinstance(content, str):
            tmp.write_text(content, encoding="utf-8")
        else:
            content(tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:  # torch.save reports its I/O failures as RuntimeError ('enforce fail')
        raise write_error(str(path), path.parent, exc) from None
    finally:
        tmp.unlink(missing_ok=True)
    return path


LOW_SPACE = 16 << 20  # below this many free bytes a write that failed without an OS reason is taken for a full disk


def free_bytes(folder: Path) -> int | None:
    """Bytes a user may still write on the disk holding `folder` (None where that cannot be asked)."""
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def mount_point(folder: Path) -> Path:
    """The mount point of the disk holding `folder` (how a user finds the disk in `df`)."""
    path = folder.resolve()
    while not path.exists() and path != path.parent:
        path = path.parent
    while not os.path.ismount(path) and path != path.parent:
        path = path.parent
    return path


def write_error(what: str, folder: Path, exc: BaseException) -> UserError:
    """One line for a failed write of `what` into `folder`: the disk and its free space where it is full,
    else the OS's reason (never torch's 'enforce fail' text)."""
    code = getattr(exc, "errno", None)
    free = free_bytes(folder)
    full = code in (errno.ENOSPC, errno.EDQUOT) or (code is None and free is not None and free < LOW_SPACE)
    if full:
        left = "" if free is None else f", {free / 2**20:.1f} MiB free"
        return UserError(f"{what}: cannot write it: the disk mounted at {mount_point(folder)} is full{left}; free "
                         "some space or write elsewhere")
    reason = getattr(exc, "strerror", None) or ("the write failed" if isinstance(exc, RuntimeError)
                                                else (str(exc).splitlines() or [type(exc).__name__])[0])
    return UserError(f"{what}: cannot write it ({reason})")
