"""repq.json read back: every field a reader of the artifact uses, checked once on entry.

A hand-edited manifest is refused with one line naming the file and the field
(``art/repq.json: post_processing.keep_top_k: must be an integer >= 1, got -3``) before any model
is built or any image is run. Keys this build does not read are left alone, so that a newer
manifest with more keys still reads.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

from ..data.transforms import PreprocessSettings
from ..deploy_config import (LOG_SQRT2_LOWERINGS, MAX_OPSET, MIN_OPSET, OPENVINO_GRAPH_FORMS, OPENVINO_PRECISIONS,
                             ORT_OPTIMIZATION_LEVELS, TARGET_CPUS)
from ..errors import UserError
from ..graph_targets import GraphForm
from ..quant.recipe import QuantSettings

MANIFEST = "repq.json"
FORMAT = "repq-export-artifact"  # the manifest's "format" value
VERSION = 1
ADDED_FILES = "added_files"  # the record of files written into an artifact after it was made
_SHA256 = re.compile(r"[0-9a-f]{64}")


def _is_int(value: Any) -> bool:
    """An integer that is not a bool (JSON true is not a count)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    """A finite int or float that is not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class _Fields:
    """Checks of one manifest; each failure is a UserError ``<file>: <field>: <problem>, got <value>``."""

    def __init__(self, path: Path):
        self.path = path

    def fail(self, key: str, problem: str, value: Any = ...) -> UserError:
        """One line: the file, the field, the problem and (if given) the value found."""
        got = "" if value is ... else f", got {value!r:.60}"
        return UserError(f"{self.path}: {key}: {problem}{got}")

    def section(self, manifest: dict, key: str, required: bool = True) -> dict | None:
        """manifest[key] as an object (None when optional and absent)."""
        if key not in manifest:
            if required:
                raise self.fail(key, "missing (incomplete manifest)")
            return None
        value = manifest[key]
        if not isinstance(value, dict):
            raise self.fail(key, "must be an object", value)
        return value

    def get(self, entry: dict, key: str, where: str, required: bool = True) -> Any:
        """entry[key], or a UserError naming `where.key` when a required key is missing."""
        if key not in entry:
            if required:
                raise self.fail(f"{where}.{key}", "missing")
            return None
        return entry[key]

    def string(self, value: Any, key: str) -> str:
        """`value` if it is a string."""
        if not isinstance(value, str):
            raise self.fail(key, "must be a string", value)
        return value

    def sha256(self, value: Any, key: str) -> str:
        """`value` if it is a sha256 hex digest (what every file record is compared with)."""
        if not (isinstance(value, str) and _SHA256.fullmatch(value)):
            raise self.fail(key, "must be a sha256 (64 lowercase hex digits)", value)
        return value

    def file_name(self, value: Any, key: str) -> str:
        """A file inside the artifact folder: a plain name, never a path out of it."""
        self.string(value, key)
        if Path(value).name != value or value in ("", ".", "..") or "\0" in value:
            raise self.fail(key, "must be a plain file name inside the artifact folder", value)
        return value

    def int_in(self, value: Any, key: str, low: int, high: int | None = None) -> int:
        """`value` if it is an integer (not a bool) in low..high."""
        if not (_is_int(value) and value >= low and (high is None or value <= high)):
            span = f">= {low}" if high is None else f"in {low}..{high}"
            raise self.fail(key, f"must be an integer {span}", value)
        return value

    def fraction(self, value: Any, key: str) -> float:
        """`value` if it is a finite number in [0, 1] (a threshold)."""
        if not (_is_number(value) and 0.0 <= value <= 1.0):
            raise self.fail(key, "must be a number in [0, 1]", value)
        return value

    def one_of(self, value: Any, key: str, allowed: tuple[str, ...]) -> str:
        """`value` if it is one of the `allowed` strings."""
        if value not in allowed or not isinstance(value, str):
            raise self.fail(key, f"must be one of {', '.join(allowed)}", value)
        return value


def read_manifest(artifact: str | Path) -> dict:
    """The manifest of an artifact directory, every field a reader uses checked (not yet the files)."""
    artifact = Path(artifact)
    manifest_path = artifact / MANIFEST
    if not manifest_path.is_file():
        raise UserError(f"{artifact}: not an artifact directory (no {MANIFEST})")
    try:
        text = manifest_path.read_text(encoding="utf-8")
    except ValueError:
        raise UserError(f"{manifest_path}: not valid JSON") from None
    except OSError as err:
        raise UserError(f"{manifest_path}: cannot read ({err.strerror or err})") from None
    manifest = parse_manifest(text, manifest_path)
    check_manifest(manifest, manifest_path)
    return manifest


def parse_manifest(text: str, path: str | Path = MANIFEST) -> Any:
    """repq.json's text as JSON, unchecked: the one place repq.json is parsed (the reader above checks what it
    gives; ``--force`` reads only the format marker and the file records of it)."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        raise UserError(f"{path}: not valid JSON") from None


def check_manifest(manifest: Any, path: Path) -> None:
    """Refuse a manifest (parsed repq.json at ``path``) any field of which a reader would trip on later."""
    f = _Fields(path)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise UserError(f"{path}: not a repq-export manifest")
    if manifest.get("version") != VERSION or not _is_int(manifest.get("version")):
        raise f.fail("version", f"this build reads version {VERSION}", manifest.get("version"))
    for key in ("w_bits", "a_bits"):
        if key not in manifest:
            raise f.fail(key, "missing (incomplete manifest)")
        f.int_in(manifest[key], key, 2, 8)
    try:
        QuantSettings.from_dict(manifest)
    except (ValueError, KeyError, TypeError) as err:
        raise UserError(f"{path}: quantization settings: {err}") from None
    if "form" in manifest:
        f.one_of(manifest["form"], "form", tuple(g.value for g in GraphForm))
    _check_source(f, manifest)
    _check_model(f, manifest)
    PreprocessSettings.from_dict(f.section(manifest, "preprocess"), f"{path}: preprocess")
    _check_post_processing(f, manifest)
    _check_backend(f, manifest)
    _check_files(f, manifest)
    _check_added_files(f, manifest)
    _check_quantizer_rows(f, manifest)


def _check_source(f: _Fields, manifest: dict) -> None:
    """source_checkpoint (what the artifact was made from) and the calibration images."""
    source = f.section(manifest, "source_checkpoint")
    f.string(f.get(source, "name", "source_checkpoint"), "source_checkpoint.name")
    f.sha256(f.get(source, "sha256", "source_checkpoint"), "source_checkpoint.sha256")
    images = manifest.get("calibration_images", [])
    if not isinstance(images, list):
        raise f.fail("calibration_images", "must be a list", images)
    for i, entry in enumerate(images):
        if not isinstance(entry, dict):
            raise f.fail(f"calibration_images[{i}]", "must be an object", entry)
        f.string(f.get(entry, "name", f"calibration_images[{i}]"), f"calibration_images[{i}].name")
        f.sha256(f.get(entry, "sha256", f"calibration_images[{i}]"), f"calibration_images[{i}].sha256")


def _check_model(f: _Fields, manifest: dict) -> None:
    """model_config (its content is checked when the detector is built), architecture and classes."""
    f.section(manifest, "model_config")
    arch = f.section(manifest, "architecture", required=False)
    num_classes = None
    if arch is not None:
        num_classes = f.int_in(f.get(arch, "num_classes", "architecture"), "architecture.num_classes", 1)
    classes = manifest.get("classes")
    if classes is not None:
        if not (isinstance(classes, list) and all(isinstance(c, str) for c in classes)):
            raise f.fail("classes", "must be null or a list of names", classes)
        if num_classes is not None and len(classes) != num_classes:
            raise f.fail("classes", f"{len(classes)} names for architecture.num_classes = {num_classes}")


def _check_post_processing(f: _Fields, manifest: dict) -> None:
    """post_processing: the thresholds written into the graph and the host's mask threshold."""
    post = f.section(manifest, "post_processing", required=False)
    if post is None:
        return
    for key in post:
        if key not in ("score_threshold", "iou_threshold", "keep_top_k", "mask_thr_binary"):
            raise f.fail(f"post_processing.{key}", "unknown key (score_threshold, iou_threshold, keep_top_k, "
                         "mask_thr_binary)")
    for key in ("score_threshold", "iou_threshold", "mask_thr_binary"):
        if key in post:
            f.fraction(post[key], f"post_processing.{key}")
    if "keep_top_k" in post:
        f.int_in(post["keep_top_k"], "post_processing.keep_top_k", 1)


def _check_backend(f: _Fields, manifest: dict) -> None:
    """backend: the session settings every runner of the artifact uses."""
    backend = f.section(manifest, "backend", required=False)
    if backend is None:
        return
    kind = f.one_of(backend.get("type"), "backend.type", ("onnxruntime", "tensorrt", "openvino"))
    if kind == "openvino":
        f.one_of(backend.get("graph_form"), "backend.graph_form", OPENVINO_GRAPH_FORMS)
        f.one_of(backend.get("inference_precision"), "backend.inference_precision", OPENVINO_PRECISIONS)
        f.one_of(backend.get("log_sqrt2_lowering", "table"), "backend.log_sqrt2_lowering", LOG_SQRT2_LOWERINGS)
        for key in ("roi_nan_guard", "static_shapes"):
            if not isinstance(backend.get(key, False), bool):
                raise f.fail(f"backend.{key}", "must be true or false", backend.get(key))
        return
    if kind == "tensorrt":
        if not isinstance(backend.get("fp16_mode", False), bool):
            raise f.fail("backend.fp16_mode", "must be true or false", backend.get("fp16_mode"))
        return
    providers = backend.get("providers", ["CPUExecutionProvider"])
    if not (isinstance(providers, list) and providers
            and all(isinstance(p, str) and p.endswith("ExecutionProvider") for p in providers)):
        raise f.fail("backend.providers", "must be a non-empty list of onnxruntime provider names", providers)
    if "graph_optimization_level" in backend:
        f.one_of(backend["graph_optimization_level"], "backend.graph_optimization_level", ORT_OPTIMIZATION_LEVELS)
    if "target_cpu" in backend:
        f.one_of(backend["target_cpu"], "backend.target_cpu", TARGET_CPUS)


def _check_files(f: _Fields, manifest: dict) -> None:
    """onnx and quant_state: file names inside the folder with their sha256, the graph's opset and shape."""
    onnx_entry = f.section(manifest, "onnx")
    quant = f.section(manifest, "quant_state")
    for key, entry in (("onnx", onnx_entry), ("quant_state", quant)):
        f.file_name(f.get(entry, "file", key), f"{key}.file")
        f.sha256(f.get(entry, "sha256", key), f"{key}.sha256")
    if not onnx_entry["file"].endswith(".onnx"):
        raise f.fail("onnx.file", "must end in .onnx", onnx_entry["file"])
    if "opset" in onnx_entry:
        f.int_in(onnx_entry["opset"], "onnx.opset", MIN_OPSET, MAX_OPSET)
    shape = onnx_entry.get("export_shape")
    if shape is not None and not (isinstance(shape, list) and len(shape) == 4 and all(_is_int(v) and v > 0
                                                                                      for v in shape)):
        raise f.fail("onnx.export_shape", "must be 4 positive integers [1, 3, H, W]", shape)


def _check_added_files(f: _Fields, manifest: dict) -> None:
    """added_files: files written into the artifact after export (engine, parity report), name -> sha256."""
    added = f.section(manifest, ADDED_FILES, required=False)
    for name, digest in (added or {}).items():
        f.file_name(name, f"{ADDED_FILES} key")
        f.sha256(digest, f"{ADDED_FILES}.{name}")


def _check_quantizer_rows(f: _Fields, manifest: dict) -> None:
    """quantizers: one object per quantizer with a name, bits and numbers (compared with quant.pth later)."""
    table = manifest.get("quantizers")
    if not isinstance(table, list):
        raise f.fail("quantizers", "must be a list (the quantizer table)", table)
    names: set[str] = set()
    for i, row in enumerate(table):
        key = f"quantizers[{i}]"
        if not isinstance(row, dict):
            raise f.fail(key, "must be an object", row)
        name = f.string(f.get(row, "name", key), f"{key}.name")
        if name in names:
            raise f.fail(f"{key}.name", "appears twice", name)
        names.add(name)
        f.int_in(f.get(row, "bits", key), f"{key}.bits", 2, 8)
        for field in ("scale", "zero_point"):
            value = row.get(field)
            if field == "zero_point" and value is None:
                continue  # log2 quantizers have none
            numbers = value if isinstance(value, list) else [value]
            if not (numbers and all(_is_number(v) for v in numbers)):
                raise f.fail(f"{key}.{field}", "must be a number or a non-empty list of numbers", value)
