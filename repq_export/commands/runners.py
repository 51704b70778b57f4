"""Build the Runner of any stage from command-line choices: torch float, fake quant, onnxruntime, TensorRT,
OpenVINO."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from ..errors import UserError
from ..runtime.base import Runner
from ..export.deploy_settings import (artifact_engine_file, artifact_onnx_file, checked_providers,
                                      openvino_precision, ort_session_settings)
from ..runtime.ort_runner import OrtRunner, ort_providers
from ..runtime.torch_runner import TorchRunner

BACKENDS = ("torch", "quant", "ort", "trt", "openvino")
ONNX_BACKENDS = ("ort", "openvino")  # backends that read the ONNX file


def model_file(path: Path, backend: str) -> Path:
    """The ONNX file or engine for `backend`: `path` itself, or the right file in an artifact directory."""
    if path.is_dir():
        path = artifact_onnx_file(path) if backend in ONNX_BACKENDS else artifact_engine_file(path)
    if not path.is_file():
        raise UserError(f"{path}: not found (--model must name an .onnx file, an engine or an artifact directory)")
    return path


def make_runner(backend: str, model: nn.Module | None = None, model_path: Path | None = None,
                device: str = "cpu", ort_opt_level: str | None = None, ov_precision: str | None = None) -> Runner:
    """The runner of `backend`; torch/quant take the (fake-quant) module, ort/trt/openvino a file.

    onnxruntime over an artifact uses the providers and optimization level its deploy config
    recorded (`ort_opt_level` overrides the level; `device='cuda'` asks for CUDA explicitly);
    OpenVINO the inference precision it recorded (`ov_precision` overrides it; else f32)."""
    if backend in ("torch", "quant"):
        if model is None:
            raise ValueError("torch/quant backends need a model")
        return TorchRunner(model, device, name=backend)
    if model_path is None:
        raise UserError(f"--backend {backend} needs --model (ONNX file, engine or artifact directory)")
    if backend == "ort":
        return ort_runner(model_path, device, ort_opt_level)
    if backend == "openvino":
        return openvino_runner(model_path, ov_precision)
    if backend == "trt":
        from ..runtime.tensorrt_support import tensorrt_available
        from ..runtime.trt_runner import TensorRTRunner

        ok, why = tensorrt_available()
        if not ok:
            raise UserError(f"--backend trt: {why}")
        return TensorRTRunner(model_file(model_path, "trt"))
    raise UserError(f"--backend: unknown backend {backend!r} (choose from {', '.join(BACKENDS)})")


def ort_runner(model_path: Path, device: str, opt_level: str | None) -> OrtRunner:
    """onnxruntime over an ONNX file or an artifact, with the session settings the artifact records."""
    import onnxruntime as ort

    providers, recorded_level = ort_session_settings(model_path)
    if device == "cuda" or providers is None:
        providers = ort_providers(device)
    else:
        providers = checked_providers(providers, ort.get_available_providers(), f"{model_path}")
    return OrtRunner(model_file(model_path, "ort"), providers=providers,
                     opt_level=opt_level or recorded_level or "all")


def openvino_runner(model_path: Path, precision: str | None = None) -> Runner:
    """OpenVINO on CPU over an ONNX file or an artifact, at `precision`, else the artifact's recorded
    inference precision, else f32; the precision it runs at is printed (OpenVINO's default is bf16
    on CPUs with BF16/AMX, so it is always set explicitly)."""
    from ..runtime.openvino_runner import OpenVINORunner, openvino_available

    ok, why = openvino_available()
    if not ok:
        raise UserError(why)
    runner = OpenVINORunner(model_file(model_path, "openvino"), precision or openvino_precision(model_path) or "f32")
    print(runner.describe())
    return runner
