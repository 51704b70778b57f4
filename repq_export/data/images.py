"""Image decoding exactly as the reference test pipeline does it (mmdet 2.11 LoadImageFromFile).

mmdet reads the file's bytes and decodes them with ``cv2.imdecode(..., IMREAD_COLOR)``; that is
what we do too, so every runner sees the same pixels as the reference: EXIF orientation applied,
grayscale replicated to three channels, alpha dropped, palettes and CMYK converted to BGR,
16-bit samples reduced to 8 bits (the high byte).

Before decoding, the file must be a regular file within the byte budget, and where its header
says how large it is (PNG, JPEG, BMP, GIF, WebP, TIFF) it must be within the pixel budget: a small
file that declares a huge picture is refused before it takes any memory. Truncated PNG and JPEG
files are named as truncated; what the decoder libraries print while decoding is caught and becomes
part of the message (or one warning line), never stray lines on stderr.
"""
from __future__ import annotations

import os
import sys
import tempfile
import threading
from contextlib import contextmanager
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np

from repq_export.errors import UserError
from repq_export.files import read_input_bytes
from repq_export.resources import MAX_PIXELS, image_file_budget

if TYPE_CHECKING:
    from repq_export.data.transforms import Preprocessed

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8"
# JPEG start-of-frame markers: they carry the picture's height and width (not DHT C4, JPG C8, DAC CC)
_JPEG_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
_JPEG_NO_LENGTH = frozenset({0x01, *range(0xD0, 0xD8)})  # TEM and RSTn stand alone
_BMP_HEADER_SIZES = (12, 40, 52, 56, 64, 108, 124)  # the DIB header versions: a 'BM' file without one is no BMP


def image_format(data: bytes) -> str | None:
    """'PNG', 'JPEG', 'BMP', 'GIF', 'WebP' or 'TIFF' from the file's first bytes; None for others."""
    if data.startswith(PNG_MAGIC):
        return "PNG"
    if data.startswith(JPEG_MAGIC):
        return "JPEG"
    if data.startswith(b"BM"):
        return "BMP"
    if data.startswith((b"GIF87a", b"GIF89a")):
        return "GIF"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "TIFF"
    return None


def header_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) as the image's header declares them, without decoding; None where not found."""
    fmt = image_format(data)
    if fmt == "PNG" and data[12:16] == b"IHDR" and len(data) >= 24:
        return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    if fmt == "JPEG":
        return _jpeg_size(data)
    if fmt == "BMP" and len(data) >= 26 and int.from_bytes(data[14:18], "little") in _BMP_HEADER_SIZES:
        if int.from_bytes(data[14:18], "little") == 12:  # OS/2 BITMAPCOREHEADER: 16-bit sizes
            return int.from_bytes(data[18:20], "little"), int.from_bytes(data[20:22], "little")
        width = int.from_bytes(data[18:22], "little", signed=True)
        height = int.from_bytes(data[22:26], "little", signed=True)  # negative: stored top-down
        return abs(width), abs(height)
    if fmt == "GIF" and len(data) >= 10:
        return int.from_bytes(data[6:8], "little"), int.from_bytes(data[8:10], "little")
    if fmt == "WebP":
        return _webp_size(data)
    if fmt == "TIFF":
        return _tiff_size(data)
    return None


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    """Width and height of a JPEG's first start-of-frame segment."""
    i = 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in _JPEG_NO_LENGTH:
            i += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image, or the scan: no frame header came first
            return None
        length = int.from_bytes(data[i + 2:i + 4], "big")
        if marker in _JPEG_SOF:
            if i + 9 > len(data):
                return None
            return int.from_bytes(data[i + 7:i + 9], "big"), int.from_bytes(data[i + 5:i + 7], "big")
        i += 2 + length
    return None


def _webp_size(data: bytes) -> tuple[int, int] | None:
    """Canvas width and height of a WebP file (VP8X extended, VP8L lossless or VP8 lossy)."""
    chunk = data[12:16]
    if chunk == b"VP8X" and len(data) >= 30:
        return int.from_bytes(data[24:27], "little") + 1, int.from_bytes(data[27:30], "little") + 1
    if chunk == b"VP8L" and len(data) >= 25:
        bits = int.from_bytes(data[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8 " and len(data) >= 30:
        return int.from_bytes(data[26:28], "little") & 0x3FFF, int.from_bytes(data[28:30], "little") & 0x3FFF
    return None


def _tiff_size(data: bytes) -> tuple[int, int] | None:
    """ImageWidth and ImageLength of a TIFF's first directory (the page OpenCV decodes)."""
    order = "little" if data[:2] == b"II" else "big"
    start = int.from_bytes(data[4:8], order)
    if start + 2 > len(data):
        return None
    count = int.from_bytes(data[start:start + 2], order)
    sizes: dict[int, int] = {}
    for k in range(count):
        entry = data[start + 2 + 12 * k:start + 14 + 12 * k]
        if len(entry) < 12:
            break
        tag, kind = int.from_bytes(entry[0:2], order), int.from_bytes(entry[2:4], order)
        if tag in (256, 257):  # ImageWidth, ImageLength: SHORT (3) or LONG (4)
            sizes[tag] = int.from_bytes(entry[8:10] if kind == 3 else entry[8:12], order)
    return (sizes[256], sizes[257]) if len(sizes) == 2 else None


def truncation(data: bytes) -> str | None:
    """Why a PNG or JPEG file is cut short (it lacks its closing chunk or marker); None if it is whole
    or another format."""
    fmt = image_format(data)
    if fmt == "PNG" and b"IEND" not in data[-4096:]:
        return "truncated: the PNG file ends before its IEND chunk"
    if fmt == "JPEG":
        scan = _jpeg_scan_start(data)
        if scan is None or data.rfind(b"\xff\xd9") < scan:
            return "truncated: the JPEG file ends before its end-of-image marker"
    return None


def _jpeg_scan_start(data: bytes) -> int | None:
    """Offset of a JPEG's first start-of-scan marker (its image data), walking the segments before it."""
    i = 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:
            i += 1
        elif marker in _JPEG_NO_LENGTH:
            i += 2
        elif marker == 0xDA:
            return i
        else:
            i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    return None


def too_many_pixels(data: bytes, max_pixels: int = MAX_PIXELS) -> str | None:
    """Why an encoded image is too large to decode, from the size its header declares; None if it is not."""
    size = header_size(data)
    if size is not None and size[0] * size[1] > max_pixels:
        return (f"its header declares {size[0]}x{size[1]} = {size[0] * size[1]:,} pixels, over the limit of "
                f"{max_pixels:,}")
    return None


def decode(data: bytes | np.ndarray) -> np.ndarray | None:
    """cv2.imdecode(IMREAD_COLOR) of encoded bytes; None where OpenCV cannot decode them."""
    try:
        return cv2.imdecode(np.frombuffer(data, np.uint8).reshape(-1), cv2.IMREAD_COLOR)
    except cv2.error:
        return None


@contextmanager
def captured_stderr() -> Iterator[list[str]]:
    """Collect what native code (libpng, libjpeg) writes to file descriptor 2 while the block runs;
    the lines are in the yielded list once it ends. Only on the main thread: elsewhere nothing is caught."""
    lines: list[str] = []
    if threading.current_thread() is not threading.main_thread():  # fd 2 is the whole process's
        yield lines
        return
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):
        yield lines
        return
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield lines
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            text = sink.read(4096).decode("utf-8", "replace")
            lines += [line.strip() for line in text.splitlines() if line.strip()]


def read_image(path: str | Path, max_pixels: int = MAX_PIXELS, option: str | None = None) -> np.ndarray:
    """Decode an image file into an (H, W, 3) uint8 BGR array, as mmcv.imfrombytes(flag='color'),
    once it is known to be a regular file within the byte and pixel budgets."""
    content = read_input_bytes(path, "image", option, image_file_budget(max_pixels),
                               f" for --max-pixels {max_pixels:,}; raise the limit with --max-pixels")
    name = f"{option} {path}" if option else str(path)
    if not content:
        raise UserError(f"{name}: cannot decode image (empty file)")
    too_large = too_many_pixels(content, max_pixels)
    if too_large is not None:
        raise UserError(f"{name}: image too large ({too_large}; raise the limit with --max-pixels)")
    cut = truncation(content)
    if cut is not None:
        raise UserError(f"{name}: cannot decode image ({cut})")
    with captured_stderr() as said:
        img = decode(content)
    if img is None:
        fmt = image_format(content)
        detail = f"a {fmt} file that OpenCV cannot decode" if fmt else "not a format OpenCV reads"
        libs = "; ".join(said)[:200]
        raise UserError(f"{name}: cannot decode image ({detail}{': ' + libs if libs else ''})")
    if said:
        print(f"warning: {name}: {'; '.join(said)[:300]}", file=sys.stderr)
    pixels = img.shape[0] * img.shape[1]
    if pixels > max_pixels:
        raise UserError(f"{name}: image too large ({img.shape[1]}x{img.shape[0]} = {pixels:,} pixels, over the "
                        f"limit of {max_pixels:,}; raise the limit with --max-pixels)")
    return img


def preprocess_file(path: str | Path, settings, max_pixels: int = MAX_PIXELS) -> "Preprocessed":
    """Read and preprocess one image file; a problem with it is a UserError naming the file."""
    from repq_export.data.transforms import preprocess

    img = read_image(path, max_pixels)
    try:
        return preprocess(img, **vars(settings))
    except UserError as exc:
        raise UserError(f"{path}: {exc}") from None


# The fewest grey levels a calibration image must span (max - min of its pixel values): below this
# it is black or one colour with faint noise, and its activations give quantizer ranges that leave
# out zero (seen with 0..1), which no integer graph can hold. Any photograph spans far more.
MIN_CALIBRATION_SPAN = 8


def check_calibration_image(path: str | Path, max_pixels: int = MAX_PIXELS) -> None:
    """Refuse an image that cannot calibrate anything: one flat colour, or nearly (see MIN_CALIBRATION_SPAN)."""
    img = read_image(path, max_pixels)
    low, high = int(img.min()), int(img.max())
    h, w = img.shape[:2]
    if low == high:
        raise UserError(f"{path}: calibration image of {w}x{h} pixels is one flat colour (value {low}); "
                        "the quantizers would see constant inputs: use real pictures")
    if high - low < MIN_CALIBRATION_SPAN:
        raise UserError(f"{path}: calibration image of {w}x{h} pixels is nearly one flat colour (its values span "
                        f"only {low}..{high} of 0..255, no dynamic range to calibrate on): use real pictures")


def blame_calibration_images(exc: UserError, paths: list[Path]) -> UserError:
    """A calibration failure told with the calibration images' names first: 'calibration images: ...'
    from quant/calibrate.py, or a quantizer that calibrated to what cannot be exported (a range that
    leaves out zero, from reparameterizing a dark image's activations: quant/reparam.py), which
    export/lowering.py reports under the quantizer's name. Any other error is returned as it is."""
    message = str(exc)
    names = ", ".join(str(p) for p in paths[:3]) + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")
    prefix = "calibration images: "
    if message.startswith(prefix):
        return UserError(f"{names}: {message[len(prefix):]}")
    if message.split(":", 1)[0].endswith("_quantizer"):
        return UserError(f"{names}: calibration on {'this image' if len(paths) == 1 else 'these images'} cannot "
                         f"be exported ({message}): the picture has too little dynamic range (dark or nearly one "
                         "colour), so a quantizer saw a range that leaves out zero; calibrate on real pictures")
    return exc
