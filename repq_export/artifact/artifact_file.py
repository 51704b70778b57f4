"""`Artifact`: an artifact directory opened and checked once, its repq.json as typed fields.

Every reader of an artifact (the commands, the server, the Triton repository writer, the parity
check) takes an `Artifact` instead of re-reading repq.json: the manifest is parsed by
`manifest_check.read_manifest` alone, every file it names is compared with its sha256, and the
quantizer table with quant.pth (read here, once, and handed on to build the fake-quant model).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from ..data.transforms import PreprocessSettings
from ..deploy_config import OnnxConfig, PostProcessing
from ..errors import UserError
from ..files import file_sha256
from ..graph_targets import GraphForm, TargetCpu
from ..quant.kinds import LOG_SQRT2
from ..quant.state import read_quant_state
from .manifest_check import ADDED_FILES, MANIFEST, read_manifest

DEFAULT_ONNX_FILE = OnnxConfig.save_file  # the ONNX file of a folder without a manifest


@dataclass(frozen=True)
class BackendRecord:
    """The backend settings the artifact's deploy config recorded; every runner of the artifact uses them."""

    type: str  # 'onnxruntime' | 'tensorrt' | 'openvino'
    providers: tuple[str, ...] | None = None  # onnxruntime; None: chosen by the device
    graph_optimization_level: str | None = None  # onnxruntime; None: 'all'
    target_cpu: TargetCpu = TargetCpu.ANY  # onnxruntime form: the CPUs the graph is exact on
    graph_form: GraphForm | None = None  # OpenVINO: the lowering it reads
    inference_precision: str | None = None  # OpenVINO: 'f32' | 'bf16'
    roi_nan_guard: bool = False  # OpenVINO: the graph carries the RoiAlign NaN guard
    static_shapes: bool = False  # OpenVINO: compiled for each input shape met
    fp16_mode: bool = False  # TensorRT

    @classmethod
    def from_dict(cls, entry: Mapping[str, Any]) -> BackendRecord:
        """The record of a (checked) manifest's ``backend`` object."""
        providers = entry.get("providers")
        form = entry.get("graph_form")
        return cls(type=entry["type"], providers=tuple(providers) if providers else None,
                   graph_optimization_level=entry.get("graph_optimization_level"),
                   target_cpu=TargetCpu(entry.get("target_cpu", TargetCpu.ANY)),
                   graph_form=GraphForm(form) if form is not None else None,
                   inference_precision=entry.get("inference_precision"),
                   roi_nan_guard=bool(entry.get("roi_nan_guard", False)), fp16_mode=bool(entry.get("fp16_mode", False)),
                   static_shapes=bool(entry.get("static_shapes", False)))


@dataclass(frozen=True, eq=False)
class Artifact:
    """An opened artifact directory: what repq.json records, checked, and the quantized state it names."""

    path: Path
    manifest: Mapping[str, Any]  # the checked repq.json: provenance and versions, which no code reads
    source_name: str  # the checkpoint it was made from
    source_sha256: str
    w_bits: int
    a_bits: int
    form: GraphForm | None  # None: an artifact from before the form was recorded
    onnx_path: Path
    engine_path: Path | None  # the TensorRT engine beside the ONNX file, where one was built
    preprocess: PreprocessSettings
    post_processing: PostProcessing
    classes: tuple[str, ...] | None
    num_classes: int | None
    model_config: Mapping[str, Any]
    calibration_check: Mapping[str, Any] | None
    backend: BackendRecord | None  # None: an artifact from before the backend was recorded
    quantizers: tuple[Mapping[str, Any], ...]
    quant_manifest: Mapping[str, Any]  # quant.pth's own manifest
    quant_state: Mapping[str, Tensor]  # quant.pth's state dict, read once

    @property
    def precision(self) -> str:
        """``W4A4``-style bit widths."""
        return f"W{self.w_bits}A{self.a_bits}"

    @property
    def quant_path(self) -> Path:
        """quant.pth (the fake-quant state), as the manifest names it."""
        return self.path / self.manifest["quant_state"]["file"]

    @property
    def target_cpu(self) -> TargetCpu:
        """The CPUs the graph is exact on ('any' for the TensorRT form and older artifacts)."""
        return self.backend.target_cpu if self.backend is not None else TargetCpu.ANY

    @classmethod
    def open(cls, path: str | Path) -> Artifact:
        """Read and check the artifact directory `path`: repq.json field by field, every file it names
        against its sha256, the quantizer table against quant.pth. UserError (one line) otherwise."""
        path = Path(path)
        manifest = read_manifest(path)
        files = {entry["file"]: entry["sha256"] for entry in (manifest["onnx"], manifest["quant_state"])}
        for name, digest in {**files, **manifest.get(ADDED_FILES, {})}.items():
            check_file(path, name, digest)
        quant_manifest, state = read_quant_state(path / manifest["quant_state"]["file"])
        check_quantizer_table(manifest, state, path / MANIFEST)
        onnx_path = path / manifest["onnx"]["file"]
        engine = engine_beside(onnx_path)
        classes = manifest.get("classes")
        backend = manifest.get("backend")
        return cls(path=path, manifest=manifest, source_name=manifest["source_checkpoint"]["name"],
                   source_sha256=manifest["source_checkpoint"]["sha256"], w_bits=manifest["w_bits"], a_bits=manifest["a_bits"],
                   form=GraphForm(manifest["form"]) if "form" in manifest else None, onnx_path=onnx_path,
                   engine_path=engine if engine.is_file() else None,
                   preprocess=PreprocessSettings.from_dict(manifest["preprocess"], f"{MANIFEST}: preprocess"),
                   post_processing=PostProcessing(**manifest.get("post_processing", {})),
                   classes=tuple(classes) if classes is not None else None,
                   num_classes=(manifest.get("architecture") or {}).get("num_classes"),
                   model_config=manifest["model_config"], calibration_check=manifest.get("calibration_check"),
                   backend=BackendRecord.from_dict(backend) if backend is not None else None,
                   quantizers=tuple(manifest["quantizers"]), quant_manifest=quant_manifest, quant_state=state)

    @classmethod
    def describing(cls, model: Path) -> Artifact | None:
        """The artifact `model` is, or whose ONNX file or engine `model` is; None for a graph from elsewhere."""
        folder = model if model.is_dir() else model.parent
        if not (folder / MANIFEST).is_file():
            return None
        artifact = cls.open(folder)
        if model.is_dir() or model.name in (artifact.onnx_path.name, engine_beside(artifact.onnx_path).name):
            return artifact
        return None


def engine_beside(onnx_path: Path) -> Path:
    """Where the TensorRT engine of an ONNX file goes: beside it, same stem, suffix ``.engine``."""
    return onnx_path.with_suffix(".engine")


def onnx_file_of(folder: Path) -> Path:
    """The ONNX file of a folder: the one an artifact's repq.json names, else the default name."""
    if not (folder / MANIFEST).exists():
        return folder / DEFAULT_ONNX_FILE
    return folder / read_manifest(folder)["onnx"]["file"]


def check_file(artifact: Path, name: str, digest: str) -> None:
    """Refuse a file the manifest names that is missing or whose bytes changed."""
    path = artifact / name
    if not path.is_file():
        raise UserError(f"{artifact}: {name} named in {MANIFEST} is missing")
    if file_sha256(path) != digest:
        raise UserError(f"{path}: does not match the sha256 in {MANIFEST} (file changed or truncated)")


def check_quantizer_table(manifest: Mapping[str, Any], state: Mapping[str, Tensor], manifest_path: Path) -> None:
    """Refuse a manifest whose quantizer table differs from quant.pth's `state` (an edited scale or zero
    point): the table is what a reader trusts, quant.pth and model.onnx what runs."""
    table = manifest["quantizers"]
    for row in table:
        name = row["name"]
        if f"{name}.scale" not in state:
            raise UserError(f"{manifest_path}: quantizer table row {str(name)[:80]!r} is not in quant.pth")
        for field_name in ("scale", "zero_point"):
            saved = state.get(f"{name}.{field_name}")
            recorded = row.get(field_name)
            if recorded is None and field_name == "zero_point" and saved is not None and row.get("kind") == LOG_SQRT2:
                continue
            expected = None if saved is None else (saved.item() if saved.dim() == 0 else saved.flatten().tolist())
            if recorded != expected:
                raise UserError(f"{manifest_path}: the quantizer table's {field_name} of {name} differs from "
                                f"quant.pth (edited?): {str(recorded)[:40]} vs {str(expected)[:40]}")
    names = {row["name"] for row in table}
    extra = sorted(k[: -len(".scale")] for k in state
                   if k.endswith("_quantizer.scale") and k[: -len(".scale")] not in names)
    if extra:
        raise UserError(f"{manifest_path}: quantizer table lacks {len(extra)} quantizer(s) of quant.pth "
                        f"(first: {extra[0]})")
