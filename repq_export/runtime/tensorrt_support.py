"""Whether TensorRT can run here: the one check that the engine builder and runner both ask."""

from __future__ import annotations


def tensorrt_available() -> tuple[bool, str]:
    """(True, versions) where TensorRT and a CUDA GPU can be used, else (False, why not)."""
    try:
        import tensorrt
    except Exception as error:  # PyPI placeholder wheels raise at import, not only ImportError
        return False, f"the tensorrt Python package cannot be imported ({type(error).__name__}: {error})"
    try:
        import torch
    except Exception as error:
        return False, f"torch cannot be imported ({error}); the TensorRT runner keeps its buffers in torch"
    if not torch.cuda.is_available():
        return False, f"TensorRT {tensorrt.__version__} is installed but no CUDA GPU is visible"
    return True, f"TensorRT {tensorrt.__version__} on {torch.cuda.get_device_name(0)}"
