"""Runs an exported ONNX graph in OpenVINO (CPU) behind the Runner interface.

OpenVINO's default inference precision on CPUs with BF16 or AMX is bf16, which moves a 4-bit
network off fake quant; the runner therefore always sets ``INFERENCE_PRECISION_HINT`` itself
(f32 unless bf16 is asked for) and records what the compiled model reports back.

With ``static_shapes`` the graph is compiled for each input shape it meets (a few seconds for a new
padded size; the last ``STATIC_CACHE`` are kept): only with static shapes does OpenVINO's CPU plugin
fuse chains of elementwise ops (the quantizers' Clip and FakeQuantize, the bisected log-sqrt2
quantizer) into single JIT kernels.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from ..boundary import INPUT_NAMES, OUTPUT_NAMES, NetOutput, as_net_output
from ..errors import UserError

PRECISIONS = ("f32", "bf16")
DEVICE = "CPU"
MISSING = "--backend openvino: the openvino package is not installed (pip install 'repq-export[openvino]')"
STATIC_CACHE = 2  # compiled models kept per runner with static_shapes (full-size W4A4: about 0.8 GiB each)


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
    `self.precision` is what the compiled model reports it runs at. `static_shapes`: compile for
    each input shape met rather than once for the graph's dynamic shapes.
    """

    codes_exact = False  # computes x * (1/d), not x / d: a code next to a rounding tie may flip

    def __init__(self, onnx_path: str | Path | bytes, precision: str = "f32", threads: int = 0,
                 name: str = "openvino", static_shapes: bool = False) -> None:
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
        self.core, self.model, self.config, self.where = core, model, config, where
        self.threads, self.static_shapes, self.name, self.precision = threads, static_shapes, name, precision
        self.compiled_by_shape: OrderedDict[tuple, tuple] = OrderedDict()
        if not static_shapes:
            self.compiled, self.request, self.ports = self._compile(model)

    def _compile(self, model) -> tuple:
        """(compiled model, its infer request, output ports by each name) of `model`; records the precision."""
        try:
            compiled = self.core.compile_model(model, DEVICE, self.config)
        except Exception as exc:
            raise UserError(f"{self.where}: OpenVINO cannot compile it ({str(exc).splitlines()[0]})") from None
        self.precision = precision_name(compiled.get_property("INFERENCE_PRECISION_HINT"))
        # an output may carry several tensor names; each maps to its port
        return compiled, compiled.create_infer_request(), {n: p for p in compiled.outputs for n in p.get_names()}

    def _for_shapes(self, feeds: dict[str, np.ndarray]) -> tuple:
        """The compiled model for these inputs: the one compiled model, or (static_shapes) the one for their shapes."""
        if not self.static_shapes:
            return self.compiled, self.request, self.ports
        key = tuple(sorted((name, tuple(np.shape(value))) for name, value in feeds.items()))
        if key not in self.compiled_by_shape:
            self.model.reshape({name: list(shape) for name, shape in key})
            self.compiled_by_shape[key] = self._compile(self.model)
            while len(self.compiled_by_shape) > STATIC_CACHE:
                self.compiled_by_shape.popitem(last=False)
        self.compiled_by_shape.move_to_end(key)
        return self.compiled_by_shape[key]

    def with_graph(self, graph: bytes) -> OpenVINORunner:
        """A compiled model of the ONNX model `graph` at the precision (and shape policy) this one runs at."""
        return OpenVINORunner(graph, self.precision, self.threads, name=f"{self.name}-probe",
                              static_shapes=self.static_shapes)

    def describe(self) -> str:
        """One line for the log: the device, the precision the compiled model runs at, the shape policy."""
        import openvino as ov

        shapes = ", compiled for each input shape" if self.static_shapes else ""
        return f"OpenVINO {ov.get_version().split('-')[0]} on {DEVICE}, inference precision {self.precision}{shapes}"

    def run_all(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Every output of the compiled model by each of its names (the tier-1 probe reads extra outputs)."""
        _, request, ports = self._for_shapes(feeds)
        results = request.infer(feeds)
        return {name: np.asarray(results[port]) for name, port in ports.items()}

    def __call__(self, img: torch.Tensor, img_hw: torch.Tensor) -> NetOutput:
        feeds = {
            INPUT_NAMES[0]: np.ascontiguousarray(img.detach().cpu().numpy(), dtype=np.float32),
            INPUT_NAMES[1]: np.ascontiguousarray(img_hw.detach().cpu().numpy(), dtype=np.float32),
        }
        values = self.run_all(feeds)
        return as_net_output([values[name] for name in OUTPUT_NAMES])
