"""Runs an exported ONNX graph in onnxruntime behind the Runner interface."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from ..graph_targets import graph_target_cpu
from ..boundary import NetOutput, as_net_output
from .cpu_features import require_cpu_for

_LEVELS = {
    "disable": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "all": "ORT_ENABLE_ALL",
}


def ort_providers(device: str) -> list[str]:
    """The execution providers for `device`: CUDA (then CPU) where onnxruntime-gpu has it."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if device == "cuda":
        if "CUDAExecutionProvider" not in available:
            raise UserError("--device cuda: onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu)")
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def session_options(opt_level: str = "all", threads: int = 0):
    """onnxruntime session options for a detector graph: `opt_level` (see `_LEVELS`), `threads`
    intra-op threads (0: onnxruntime's default), and no memory pattern.

    The memory pattern (onnxruntime's default) plans one block for all intermediate tensors per
    run; at 800x1216 this graph's block is re-faulted from the OS on every run (about 28,000
    minor page faults a run against 15 without it), which cost about 9% of a W4A4 forward on 2
    threads here (compare `tools/bench_onnxruntime.py --mem-pattern on`). Without it the arena reuses
    its buffers across runs."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _LEVELS[opt_level])
    if threads:
        opts.intra_op_num_threads = threads
    opts.enable_mem_pattern = False
    opts.log_severity_level = 3
    return opts


class OrtRunner:
    """An onnxruntime session over `onnx_path` (or an in-memory ONNX model's bytes); `opt_level` is
    onnxruntime's graph optimization level.

    The default ('all') is what a user gets without asking; the exporter guarantees that the graph
    is exact at that level (docs/numerics.md, 'Backend rules').
    """

    codes_exact = True  # onnxruntime divides by the scale: every code off a float tie is fake quant's

    def __init__(self, onnx_path: str | Path | bytes, device: str = "cpu", opt_level: str = "all",
                 providers: list[str] | None = None, threads: int = 0, name: str = "ort") -> None:
        import onnxruntime as ort

        if isinstance(onnx_path, bytes):
            model, where = onnx_path, "the ONNX model"
        else:
            path = Path(onnx_path)
            if not path.is_file():
                raise UserError(f"{path}: no such ONNX file")
            model, where = str(path), str(path)
        self.providers = providers or ort_providers(device)
        self.opt_level, self.threads = opt_level, threads
        try:
            self.session = ort.InferenceSession(model, session_options(opt_level, threads), providers=self.providers)
        except Exception as exc:  # onnxruntime raises its own exception types for bad files
            raise UserError(f"{where}: onnxruntime cannot load it ({str(exc).splitlines()[0]})") from None
        if self.session.get_providers()[0] == "CPUExecutionProvider":  # a GPU runs no u8s8 CPU kernels
            require_cpu_for(graph_target_cpu(self.session.get_modelmeta().custom_metadata_map), where)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.name = name

    def with_graph(self, graph: bytes) -> OrtRunner:
        """A session over the ONNX model `graph` with this one's providers, level and threads."""
        return OrtRunner(graph, opt_level=self.opt_level, providers=self.providers, threads=self.threads,
                         name=f"{self.name}-probe")

    def run_all(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Every output of the graph by name (the tier-1 probe reads extra outputs)."""
        return dict(zip(self.output_names, self.session.run(None, feeds)))

    def __call__(self, img: torch.Tensor, img_hw: torch.Tensor) -> NetOutput:
        feeds = {
            self.input_names[0]: np.ascontiguousarray(img.detach().cpu().numpy(), dtype=np.float32),
            self.input_names[1]: np.ascontiguousarray(img_hw.detach().cpu().numpy(), dtype=np.float32),
        }
        return as_net_output(self.session.run(None, feeds))
