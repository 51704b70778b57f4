"""File helpers every stage shares: content hashes for manifests, and writing a file so that no
half-written one is ever left under its real name (also on Ctrl-C, SIGTERM or a full disk)."""

from __future__ import annotations

import hashlib
import os
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from repq_export.errors import UserError


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
    except (OSError, RuntimeError) as exc:  # torch.save reports some I/O failures as RuntimeError
        reason = getattr(exc, "strerror", None) or (str(exc).splitlines() or [type(exc).__name__])[0]
        raise UserError(f"{path}: cannot write ({reason})") from None
    finally:
        tmp.unlink(missing_ok=True)
    return path
