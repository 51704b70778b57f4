"""Where the files shipped inside the package live: model configs, deploy configs, bundled detectors.

They sit inside the package so that an installed wheel finds them exactly as a source checkout
does (the checkout's top-level ``configs/`` and ``deploy_configs/`` are links to these folders).
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

PACKAGE_DIR = Path(str(files("repq_export")))
CONFIGS_DIR = PACKAGE_DIR / "configs"
DEPLOY_CONFIGS_DIR = PACKAGE_DIR / "deploy_configs"
ASSETS_DIR = PACKAGE_DIR / "assets"
DEFAULT_DEPLOY_CONFIG = DEPLOY_CONFIGS_DIR / "instance-seg_onnxruntime_cpu.py"

# ------------------------------------------------------------------ budgets on what is read
# Every input file is checked against these before it is read (repq_export/files.py); each is far
# above what a real input needs, and far below what would exhaust a machine's memory.

# mmdet model configs and deploy configs are Python files of a few KB (with their _base_ files);
# 1 MiB is a hundred times the largest of them.
MAX_CONFIG_BYTES = 1 << 20
# COCO annotation files: train2017's instances file, the largest a user calibrates on, is 448 MB;
# json.load needs several times the file size in memory, so 1 GiB is where we stop.
MAX_ANNOTATION_BYTES = 1 << 30
# Pixels of one image, width x height, as declared by its header and as decoded: 64 Mi is a 8192x8192
# picture, four times a 24 MP camera's; the decoded BGR array is then at most 192 MiB. The server
# refuses larger requests; the command line takes --max-pixels to raise it.
MAX_PIXELS = 64 * 1024 * 1024
# Bytes of one image file per allowed pixel: an uncompressed 16-bit RGBA picture (8 bytes a pixel)
# fits twice, so no real file of an admitted size is refused for its bytes; plus 64 MiB for what a
# file carries besides its pixels (EXIF, ICC profiles, XMP, thumbnails), however small the picture.
IMAGE_BYTES_PER_PIXEL = 16
IMAGE_METADATA_BYTES = 64 << 20


def image_file_budget(max_pixels: int) -> int:
    """The largest image file read under a pixel budget of `max_pixels`."""
    return IMAGE_BYTES_PER_PIXEL * max_pixels + IMAGE_METADATA_BYTES
# Elements of one state-dict tensor: the largest weight of a Swin-L Cascade Mask R-CNN (a box head's
# shared fc, 12544x1024) has 12.8 M; 2^28 (1 GiB of float32) is twenty times that, and stops a tensor
# that claims 10^12 elements over a one-element storage (stride 0) before anything touches it.
MAX_TENSOR_ELEMENTS = 1 << 28
# The pickle inside a checkpoint (data.pkl; the tensors' bytes are stored beside it): structure only,
# a few MB even with an optimizer's state; a (compressed) one declaring more than 256 MiB is not unpacked.
MAX_PICKLE_BYTES = 256 << 20
