"""Run a TensorRT engine of the detector: one padded image in, the network outputs out.

Uses TensorRT 10's name-based I/O API with torch CUDA tensors as buffers (torch already owns
a CUDA context and a caching allocator). NMS makes the detection count N data-dependent, so
TensorRT cannot say the output shapes before the run: every output gets an
``IOutputAllocator`` that TensorRT calls back with the size and shape once it knows them.
``tensorrt`` is imported only inside functions, so this module imports anywhere.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from repq_export.boundary import INPUT_NAMES, OUTPUT_NAMES, NetOutput, as_net_output
from repq_export.errors import UserError
from repq_export.runtime.tensorrt_support import tensorrt_available


def _torch_dtype(trt, trt_dtype) -> torch.dtype:
    """The torch dtype of a TensorRT I/O tensor type."""
    names = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16,
             "INT64": torch.int64, "INT32": torch.int32, "INT8": torch.int8, "UINT8": torch.uint8,
             "BOOL": torch.bool}
    table = {getattr(trt.DataType, name): dtype for name, dtype in names.items()
             if hasattr(trt.DataType, name)}  # BF16 and INT64 exist from TensorRT 9/10
    if trt_dtype not in table:
        raise UserError(f"TensorRT I/O type {trt_dtype} has no torch equivalent")
    return table[trt_dtype]


def _make_output_allocator(trt, device: torch.device):
    """An IOutputAllocator that hands TensorRT torch-owned byte buffers and records the shape."""

    class _OutputAllocator(trt.IOutputAllocator):
        def __init__(self):
            trt.IOutputAllocator.__init__(self)
            self.buffer = None
            self.shape = None

        def reallocate_output(self, tensor_name, memory, size, alignment):
            # Grow only; at least 1 byte, since address 0 tells TensorRT the allocation failed
            # (N = 0 detections asks for 0 bytes).
            size = max(int(size), 1)
            if self.buffer is None or self.buffer.numel() < size:
                self.buffer = torch.empty(size, dtype=torch.uint8, device=device)
            return self.buffer.data_ptr()

        def reallocate_output_async(self, tensor_name, memory, size, alignment, stream):
            return self.reallocate_output(tensor_name, memory, size, alignment)

        def notify_shape(self, tensor_name, shape):
            self.shape = tuple(int(d) for d in shape)

    return _OutputAllocator()


class TensorRTRunner:
    """The Runner over a TensorRT engine: (img [1,3,H,W], img_hw [2]) -> NetOutput(boxes [N,4] f32,
    scores [N] f32, labels [N] i64, masks [N,28,28] f32), CPU tensors like the torch detector's."""

    def __init__(self, engine_path: str | Path, device: str = "cuda", name: str = "tensorrt"):
        self.engine_path = Path(engine_path)
        self.name = name
        available, why = tensorrt_available()
        if not available:
            raise UserError(f"{self.engine_path}: cannot run a TensorRT engine: {why}")
        if not self.engine_path.is_file():
            raise UserError(f"{self.engine_path}: no such engine file")
        import tensorrt as trt

        self._trt = trt
        self.device = torch.device(device)
        if self.device.type != "cuda":
            raise UserError(f"device {device!r}: TensorRT engines run on a CUDA device")
        self._logger = trt.Logger(trt.Logger.WARNING)
        trt.init_libnvinfer_plugins(self._logger, "")  # ROIAlign_TRT lives in the plugin library
        with torch.cuda.device(self.device):
            self._runtime = trt.Runtime(self._logger)
            self.engine = self._runtime.deserialize_cuda_engine(self.engine_path.read_bytes())
            if self.engine is None:
                raise UserError(f"{self.engine_path}: TensorRT {trt.__version__} cannot load this engine "
                                "(built by another TensorRT version or for another GPU?)")
            self.context = self.engine.create_execution_context()
        self._check_io_names()
        self._allocators = {}
        for name in OUTPUT_NAMES:
            self._allocators[name] = _make_output_allocator(trt, self.device)
            if not self.context.set_output_allocator(name, self._allocators[name]):
                raise RuntimeError(f"{self.engine_path}: TensorRT refused an output allocator for {name}")

    def _check_io_names(self) -> None:
        trt = self._trt
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = {n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT}
        outputs = set(names) - inputs
        if inputs != set(INPUT_NAMES) or outputs != set(OUTPUT_NAMES):
            raise UserError(f"{self.engine_path}: engine I/O is inputs {sorted(inputs)}, outputs "
                            f"{sorted(outputs)}; expected {list(INPUT_NAMES)} -> {list(OUTPUT_NAMES)}")

    def _bind_input(self, name: str, value: torch.Tensor) -> torch.Tensor:
        """Copy ``value`` to where the engine wants it (GPU, or host for shape inputs); bind it."""
        trt = self._trt
        dtype = _torch_dtype(trt, self.engine.get_tensor_dtype(name))
        on_host = self.engine.get_tensor_location(name) == trt.TensorLocation.HOST
        tensor = value.to(device="cpu" if on_host else self.device, dtype=dtype).contiguous()
        if not self.context.set_input_shape(name, tuple(tensor.shape)):
            low, _, high = self.engine.get_tensor_profile_shape(name, 0)
            raise UserError(f"{self.engine_path}: input {name} of shape {list(tensor.shape)} is outside "
                            f"the engine's profile {list(low)} .. {list(high)}")
        if not self.context.set_tensor_address(name, tensor.data_ptr()):
            raise RuntimeError(f"{self.engine_path}: TensorRT refused the buffer of input {name}")
        return tensor  # kept alive by the caller until the run has finished

    def _read_output(self, name: str) -> torch.Tensor:
        allocator = self._allocators[name]
        dtype = _torch_dtype(self._trt, self.engine.get_tensor_dtype(name))
        if allocator.shape is None or any(d < 0 for d in allocator.shape):
            raise RuntimeError(f"TensorRT did not report the shape of output {name}")
        count = math.prod(allocator.shape)
        if count == 0:  # no detections: TensorRT may not have asked for memory at all
            return torch.empty(allocator.shape, dtype=dtype)
        itemsize = torch.empty(0, dtype=dtype).element_size()
        flat = allocator.buffer[: count * itemsize].view(dtype)
        return flat.reshape(allocator.shape).cpu()

    def __call__(self, img: torch.Tensor, img_hw: torch.Tensor) -> NetOutput:
        """Run one image; returns (boxes, scores, labels, masks) on the CPU."""
        with torch.cuda.device(self.device), torch.inference_mode():
            for allocator in self._allocators.values():
                allocator.shape = None
            bound = [self._bind_input("img", img), self._bind_input("img_hw", img_hw)]
            stream = torch.cuda.current_stream(self.device)
            if not self.context.execute_async_v3(stream.cuda_stream):
                raise RuntimeError(f"{self.engine_path}: TensorRT execution failed (see its messages)")
            stream.synchronize()
            del bound
            outputs = [self._read_output(name) for name in OUTPUT_NAMES]
        return as_net_output(outputs)
