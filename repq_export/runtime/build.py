"""Every runner is built here: torch float and fake quant from a model; onnxruntime, TensorRT and OpenVINO
from an opened `Artifact` (with the session settings its deploy config recorded) or a bare graph file."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from ..artifact.artifact_file import Artifact, engine_beside, onnx_file_of
from ..errors import UserError
from .base import Runner
from .ort_runner import OrtRunner, ort_providers
from .torch_runner import TorchRunner

BACKENDS = ("torch", "quant", "ort", "trt", "openvino")
ONNX_BACKENDS = ("ort", "openvino")  # backends that read the ONNX file

Source = Artifact | nn.Module | Path  # what a runner runs: an artifact, a (fake-quant) model, a graph file


@dataclass(frozen=True)
class RunnerSettings:
    """How to run, beside what the artifact recorded: the device and the overrides a command line gives."""

    device: str = "cpu"  # 'cuda' asks onnxruntime for CUDA explicitly; TensorRT always runs on CUDA
    ort_opt_level: str | None = None  # overrides the artifact's onnxruntime optimization level
    ov_precision: str | None = None  # overrides the artifact's OpenVINO inference precision (else f32)
    threads: int = 0  # onnxruntime intra-op threads (0: its default)


def runner_for(backend: str, source: Source | None, settings: RunnerSettings = RunnerSettings(),
               log: Callable[[str], None] = print) -> Runner:
    """The runner of `backend` over `source`: torch/quant take a model (an artifact's fake-quant model is
    `artifact.detector.fake_quant_model`); ort/trt/openvino an artifact, or an ONNX file, engine or folder."""
    if backend in ("torch", "quant"):
        if not isinstance(source, nn.Module):
            raise ValueError("torch/quant backends need a model")
        return TorchRunner(source, settings.device, name=backend)
    if source is None or isinstance(source, nn.Module):
        raise UserError(f"--backend {backend} needs --model (ONNX file, engine or artifact directory)")
    if isinstance(source, Path) and source.is_dir():
        source = Artifact.describing(source) or source  # a folder without repq.json: its model.onnx
    if backend == "ort":
        return ort_runner(source, settings)
    if backend == "openvino":
        return openvino_runner(source, settings.ov_precision, log)
    if backend == "trt":
        from .tensorrt_support import tensorrt_available
        from .trt_runner import TensorRTRunner

        ok, why = tensorrt_available()
        if not ok:
            raise UserError(f"--backend trt: {why}")
        return TensorRTRunner(model_file(source, "trt"))
    raise UserError(f"--backend: unknown backend {backend!r} (choose from {', '.join(BACKENDS)})")


def model_file(source: Artifact | Path, backend: str) -> Path:
    """The ONNX file or engine `backend` reads: `source` itself, or the right file of an artifact."""
    if isinstance(source, Artifact):
        path = source.onnx_path if backend in ONNX_BACKENDS else engine_beside(source.onnx_path)
    elif source.is_dir():
        onnx_path = onnx_file_of(source)
        path = onnx_path if backend in ONNX_BACKENDS else engine_beside(onnx_path)
    else:
        path = source
    if not path.is_file():
        raise UserError(f"{path}: not found (--model must name an .onnx file, an engine or an artifact directory)")
    return path


def ort_runner(source: Artifact | Path, settings: RunnerSettings) -> OrtRunner:
    """onnxruntime over an ONNX file or an artifact, with the session settings the artifact recorded
    (`settings.ort_opt_level` overrides the level; device 'cuda' asks for CUDA explicitly)."""
    import onnxruntime as ort

    recorded = source.backend if isinstance(source, Artifact) else None
    if recorded is None or recorded.type != "onnxruntime":
        recorded = None
    if settings.device == "cuda" or recorded is None or recorded.providers is None:
        providers = ort_providers(settings.device)
    else:
        where = str(source.path)
        providers = checked_providers(list(recorded.providers), ort.get_available_providers(), where)
    level = settings.ort_opt_level or (recorded.graph_optimization_level if recorded else None) or "all"
    return OrtRunner(model_file(source, "ort"), providers=providers, opt_level=level, threads=settings.threads)


def checked_providers(providers: list[str], available: list[str], where: str) -> list[str]:
    """`providers` if this onnxruntime has every one of them, else one line saying which is missing."""
    missing = [p for p in providers if p not in available]
    if missing:
        raise UserError(f"{where}: onnxruntime here lacks {', '.join(missing)} (has {', '.join(available)}); "
                        "export with a deploy config for this machine, e.g. instance-seg_onnxruntime_cpu.py")
    return providers


def openvino_runner(source: Artifact | Path, precision: str | None, log: Callable[[str], None]) -> Runner:
    """OpenVINO on CPU at `precision`, else the artifact's recorded inference precision, else f32, compiled per
    input shape where the artifact says so; the precision it runs at is logged (OpenVINO's default is bf16 on
    CPUs with BF16/AMX, so it is always set)."""
    from .openvino_runner import OpenVINORunner, openvino_available

    ok, why = openvino_available()
    if not ok:
        raise UserError(why)
    recorded = source.backend if isinstance(source, Artifact) else None
    if recorded is not None and recorded.type != "openvino":
        recorded = None
    precision = precision or (recorded and recorded.inference_precision) or "f32"
    static = bool(recorded and recorded.static_shapes)
    runner = OpenVINORunner(model_file(source, "openvino"), precision, static_shapes=static)
    log(runner.describe())
    return runner
