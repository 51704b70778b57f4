"""Build the Runner of any stage from command-line choices: torch float, fake quant, onnxruntime, TensorRT."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from ..errors import UserError
from ..runtime.base import Runner
from ..runtime.ort_runner import OrtRunner
from ..runtime.torch_runner import TorchRunner

BACKENDS = ("torch", "quant", "ort", "trt")


def model_file(path: Path, backend: str) -> Path:
    """The ONNX file or engine for `backend`: `path` itself, or the right file in an artifact directory."""
    if path.is_dir():
        path = path / ("model.onnx" if backend == "ort" else "model.engine")
    if not path.is_file():
        raise UserError(f"{path}: not found (--model must name an .onnx file, an engine or an artifact directory)")
    return path


def make_runner(backend: str, model: nn.Module | None = None, model_path: Path | None = None,
                device: str = "cpu", ort_opt_level: str = "all") -> Runner:
    """The runner of `backend`; torch/quant take the (fake-quant) module, ort/trt a file."""
    if backend in ("torch", "quant"):
        if model is None:
            raise ValueError("torch/quant backends need a model")
        return TorchRunner(model, device, name=backend)
    if model_path is None:
        raise UserError(f"--backend {backend} needs --model (ONNX file, engine or artifact directory)")
    if backend == "ort":
        return OrtRunner(model_file(model_path, "ort"), device=device, opt_level=ort_opt_level)
    if backend == "trt":
        from ..export.tensorrt_builder import tensorrt_available
        from ..runtime.trt_runner import TensorRTRunner

        ok, why = tensorrt_available()
        if not ok:
            raise UserError(f"--backend trt: {why}")
        return TensorRTRunner(model_file(model_path, "trt"))
    raise UserError(f"--backend: unknown backend {backend!r} (choose from {', '.join(BACKENDS)})")
