"""Runs an exported ONNX graph in OpenVINO (CPU) behind the Runner interface.

OpenVINO's default inference precision on CPUs with BF16 or AMX is bf16, which moves a 4-bit
network off fake quant; the runner therefore always sets ``INFERENCE_PRECISION_HINT`` itself
(f32 unless bf16 is asked for) and records what the compiled model reports back.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..boundary import INPUT_NAMES, OUTPUT_NAMES, NetOutput, as_net_output
from ..errors import UserError

PRECISIONS = ("f32", "bf16")
DEVICE = "CPU"
MISSING = "--backend openvino: the openvino package is not installed (pip install 'repq-export[openvino]')"


def openvino_available() -> tuple[bool, str]:
    """(True, '') where the openvino package imports, else (False, the one-line reason)."""
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False, MISSING
    return True, ""


def openvino_core():
    """An OpenVINO Core, or the one-line UserError saying the extra is missing."""
    ok, why = openvino_available()
    if not ok:
        raise UserError(why)
    import openvino as ov

    return ov.Core()


def compile_config(precision: str = "f32", threads: int = 0) -> dict[str, str]:
    """The CPU plugin properties the runner compiles with: the inference precision, always explicit,
    and `threads` inference threads (0: OpenVINO's default)."""
    if precision not in PRECISIONS:
        raise UserError(f"--ov-precision {precision}: choose from {', '.join(PRECISIONS)}")
    config = {"INFERENCE_PRECISION_HINT": precision}
    if threads:
        config["INFERENCE_NUM_THREADS"] = str(threads)
    return config


def precision_name(value) -> str:
    """'f32' / 'bf16' from what OpenVINO reports for INFERENCE_PRECISION_HINT (an element type or a string)."""
    return value.to_string() if hasattr(value, "to_string") else str(value).lower()


class OpenVINORunner:
    """An OpenVINO CPU compiled model over `onnx_path` (or an in-memory ONNX model's bytes).

    `precision` is the inference precision ('f32' default; 'bf16' only when asked), and
    `self.precision` is what the compiled model reports it runs at.
    """

    codes_exact = False  # computes x * (1/d), not x / d: a code next to a rounding tie may flip

    def __init__(self, onnx_path: str | Path | bytes, precision: str = "f32", threads: int = 0,
                 name: str = "openvino") -> None:
        core = openvino_core()
        config = compile_config(precision, threads)
        if isinstance(onnx_path, bytes):
            model = core.read_model(onnx_path, b"")
            where = "the ONNX model"
        else:
            path = Path(onnx_path)
            if not path.is_file():
                raise UserError(f"{path}: no such ONNX file")
            where = str(path)
            try:
                model = core.read_model(str(path))
            except Exception as exc:  # OpenVINO raises its own RuntimeError subclasses for bad files
                raise UserError(f"{path}: OpenVINO cannot read it ({str(exc).splitlines()[0]})") from None
        try:
            self.compiled = core.compile_model(model, DEVICE, config)
        except Exception as exc:
            raise UserError(f"{where}: OpenVINO cannot compile it ({str(exc).splitlines()[0]})") from None
        self.precision = precision_name(self.compiled.get_property("INFERENCE_PRECISION_HINT"))
        self.threads = threads
        self.request = self.compiled.create_infer_request()
        # an output may carry several tensor names; each maps to its port
        self.ports = {name: port for port in self.compiled.outputs for name in port.get_names()}
        self.name = name

    def with_graph(self, graph: bytes) -> OpenVINORunner:
        """A compiled model of the ONNX model `graph` at the precision this one runs at."""
        return OpenVINORunner(graph, self.precision, self.threads, name=f"{self.name}-probe")

    def describe(self) -> str:
        """One line for the log: the device and the precision the compiled model runs at."""
        import openvino as ov

        return f"OpenVINO {ov.get_version().split('-')[0]} on {DEVICE}, inference precision {self.precision}"

    def run_all(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Every output of the compiled model by each of its names (the tier-1 probe reads extra outputs)."""
        results = self.request.infer(feeds)
        return {name: np.asarray(results[port]) for name, port in self.ports.items()}

    def __call__(self, img: torch.Tensor, img_hw: torch.Tensor) -> NetOutput:
        feeds = {
            INPUT_NAMES[0]: np.ascontiguousarray(img.detach().cpu().numpy(), dtype=np.float32),
            INPUT_NAMES[1]: np.ascontiguousarray(img_hw.detach().cpu().numpy(), dtype=np.float32),
        }
        values = self.run_all(feeds)
        return as_net_output([values[name] for name in OUTPUT_NAMES])
