"""What a deploy config changes in an artifact, and how a runner reads it back from repq.json.

Every field of a deploy config either takes effect here or is refused when the file is read
(``repq_export.deploy_config``): the R-CNN post-processing thresholds are written into the graph,
``save_file`` names the ONNX file (and the engine beside it), ``input_shape`` fixes the padded size,
and the onnxruntime session settings travel in the manifest to every runner of the artifact.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from ..deploy_config import DeployConfig, OnnxConfig, OnnxRuntimeConfig, OpenVINOConfig, PostProcessing
from ..errors import UserError
from ..output_dir import MANIFEST

DEFAULT_ONNX_FILE = OnnxConfig.save_file  # an artifact from before save_file was recorded


def apply_post_processing(detector: nn.Module, post: PostProcessing) -> None:
    """Set the RoI head's test settings (score threshold, NMS IoU, detections kept) that the graph carries."""
    head = detector.roi_head
    head.score_thr = float(post.score_threshold)
    head.nms_iou = float(post.iou_threshold)
    head.max_per_img = int(post.keep_top_k)


def post_processing_entry(post: PostProcessing) -> dict:
    """The manifest's record of the post-processing an artifact was exported with."""
    return {"score_threshold": post.score_threshold, "iou_threshold": post.iou_threshold,
            "keep_top_k": post.keep_top_k, "mask_thr_binary": post.mask_thr_binary}


def post_processing_of(manifest: dict) -> PostProcessing:
    """The post-processing recorded in a manifest (older artifacts: the reference's defaults)."""
    return PostProcessing(**manifest.get("post_processing", {}))


def backend_entry(deploy: DeployConfig) -> dict:
    """The manifest's record of the backend settings that runners of the artifact use."""
    backend = deploy.backend
    if isinstance(backend, OnnxRuntimeConfig):
        return {"type": backend.type, "providers": list(backend.providers),
                "graph_optimization_level": backend.graph_optimization_level, "target_cpu": backend.target_cpu}
    if isinstance(backend, OpenVINOConfig):
        return {"type": backend.type, "device": backend.device, "graph_form": backend.graph_form,
                "inference_precision": backend.inference_precision, "roi_nan_guard": True}
    return {"type": backend.type, "fp16_mode": backend.fp16_mode}


def engine_name(onnx_file: str) -> str:
    """The TensorRT engine's file name beside an ONNX file: same stem, suffix ``.engine``."""
    return str(Path(onnx_file).with_suffix(".engine"))


def artifact_onnx_file(artifact: Path) -> Path:
    """The ONNX file of an artifact directory, as its (checked) manifest names it; a folder without a
    manifest is looked into for the default name."""
    from .manifest_check import read_manifest

    if not (artifact / MANIFEST).exists():
        return artifact / DEFAULT_ONNX_FILE
    return artifact / read_manifest(artifact)["onnx"]["file"]


def artifact_engine_file(artifact: Path) -> Path:
    """The TensorRT engine file of an artifact directory (beside its ONNX file)."""
    return artifact_onnx_file(artifact).with_suffix(".engine")


def recorded_manifest(model: Path) -> dict | None:
    """The checked manifest that describes `model`: an artifact directory's, or that of the artifact
    directory holding the ONNX file or engine `model`; None for a graph from elsewhere."""
    from .manifest_check import read_manifest

    if model.is_dir():
        return read_manifest(model) if (model / MANIFEST).exists() else None
    folder = model.parent
    if not (folder / MANIFEST).is_file():
        return None
    manifest = read_manifest(folder)
    onnx_file = manifest["onnx"]["file"]
    return manifest if model.name in (onnx_file, engine_name(onnx_file)) else None


def ort_session_settings(artifact: Path) -> tuple[list[str] | None, str | None]:
    """(providers, graph optimization level) an artifact's deploy config asked for; (None, None)
    for a bare ONNX file or an artifact exported for TensorRT."""
    manifest = recorded_manifest(artifact) if artifact.is_dir() else None
    backend = (manifest or {}).get("backend") or {}
    if backend.get("type") != "onnxruntime":
        return None, None
    return list(backend.get("providers") or []) or None, backend.get("graph_optimization_level")


def checked_providers(providers: list[str], available: list[str], where: str) -> list[str]:
    """`providers` if this onnxruntime has every one of them, else one line saying which is missing."""
    missing = [p for p in providers if p not in available]
    if missing:
        raise UserError(f"{where}: onnxruntime here lacks {', '.join(missing)} (has {', '.join(available)}); "
                        "export with a deploy config for this machine, e.g. instance-seg_onnxruntime_cpu.py")
    return providers


def openvino_precision(artifact: Path) -> str | None:
    """The inference precision an artifact's OpenVINO deploy config recorded; None for a bare ONNX
    file or an artifact exported for another backend."""
    manifest = recorded_manifest(artifact) if artifact.is_dir() else None
    backend = (manifest or {}).get("backend") or {}
    return backend.get("inference_precision") if backend.get("type") == "openvino" else None
