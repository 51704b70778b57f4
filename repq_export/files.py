"""File helpers every stage shares: content hashes for manifests, and writing a file so that no
half-written one is ever left under its real name (also on Ctrl-C, SIGTERM or a full disk)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
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
