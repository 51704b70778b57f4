"""Argument types and the error wrapper shared by every command."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

import torch

from ..errors import UserError


class CommandParser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors end like every other bad input: one `error:` line, exit 2.

    argparse's own error() prints the whole usage block before the message; a user then has to
    find the one line that matters in it.
    """

    def error(self, message: str) -> NoReturn:
        message = " ".join(message.split())
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def bits(text: str) -> int:
    """A bit width: an integer from 2 to 8."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not an integer bit width (2..8)") from None
    if not 2 <= value <= 8:
        raise argparse.ArgumentTypeError(f"{value} bits is outside 2..8")
    return value


def positive_int(text: str) -> int:
    """A count of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def non_negative_int(text: str) -> int:
    """A count that may be 0 (0 often meaning: the library's default)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} must be 0 or more")
    return value


def positive_number(text: str) -> float:
    """A finite number above 0 (a size or a time)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
    if not 0.0 < value < float("inf"):  # also refuses nan
        raise argparse.ArgumentTypeError(f"{value:g} must be a number above 0")
    return value


def fraction(text: str) -> float:
    """A number from 0 to 1 (a score threshold)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
    if not 0.0 <= value <= 1.0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"{value:g} is outside 0..1")
    return value


def max_pixels_option(p: argparse.ArgumentParser, what: str = "image the command reads") -> None:
    """--max-pixels: the pixel budget of every image the command reads (resources.MAX_PIXELS by default)."""
    from ..resources import MAX_PIXELS

    p.add_argument("--max-pixels", type=positive_int, default=MAX_PIXELS, help=f"refuse an {what} of more "
                   "pixels (width x height) than this, read from the image's header before decoding where it "
                   f"says (PNG, JPEG, BMP, GIF, WebP, TIFF) (default {MAX_PIXELS:,}, an 8192x8192 picture)")


def default_device() -> str:
    """cuda where a GPU is visible, else cpu."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def device(text: str) -> str:
    """cpu or cuda; cuda only where a GPU is visible."""
    if text not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"'{text}' is not a device (cpu or cuda)")
    if text == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError("cuda asked for but torch sees no CUDA GPU")
    return text


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that every `finally` (temporary folders) runs the same way."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated()


def run_command(body: Callable[[], int]) -> int:
    """Run a command body; bad input ends as one line on stderr and exit code 2.

    SIGTERM is turned into an exception, as SIGINT is by Python, so temporary outputs are removed
    on both; the exit codes are the shell's for those signals (143, 130)."""
    previous = None
    printable_streams()
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        return body()
    except UserError as exc:
        print(f"error: {one_line(str(exc))}", file=sys.stderr)
        return 2
    except RecursionError:
        print("error: input nested too deeply to process", file=sys.stderr)
        return 2
    except Terminated:
        print("terminated", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def printable_streams() -> None:
    """Let stdout and stderr print any text, whatever their encoding: a file name that is not valid in
    it (bytes of another locale, kept by Python as surrogates) is shown with backslash escapes
    instead of ending the command in a UnicodeEncodeError (PYTHONIOENCODING=utf-8:strict)."""
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)  # a TextIOWrapper; pytest's capture may not be
        if reconfigure is not None:
            reconfigure(errors="backslashreplace")


def one_line(message: str) -> str:
    """A message on one line (a UserError built from a library's text may hold newlines)."""
    return " ".join(message.split())


def output_file(path: Path | None, option: str) -> None:
    """Refuse an output file that cannot be written before any work (the rule lives in output_dir)."""
    from ..output_dir import check_output_file

    check_output_file(path, option)
