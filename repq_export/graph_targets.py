"""What an exported graph is made for: its form (whose lowering) and the CPUs it is exact on.

String-valued enums, so that repq.json, deploy configs and the graph's metadata keep the same
words ('tensorrt', 'onnxruntime', 'any', 'vnni') while code compares members, not literals.
"""

from __future__ import annotations

from enum import StrEnum


class GraphForm(StrEnum):
    """The exact lowerings of one quantization state (export/forms.py explains each)."""

    TENSORRT = "tensorrt"
    ONNXRUNTIME = "onnxruntime"
    OPENVINO = "openvino"


class LogSqrt2Lowering(StrEnum):
    """How the softmax's log-sqrt2 quantizer is written as float ops (export/qdq.py explains each);
    both give the fake quantizer's codes."""

    TABLE = "table"  # Log guesses the code, two table lookups fix it: onnxruntime, TensorRT
    BISECT = "bisect"  # comparisons and power-of-two rescalings only: one fused JIT kernel on OpenVINO


class TargetCpu(StrEnum):
    """The CPUs an onnxruntime-form graph is exact on (deploy_config.py explains each)."""

    ANY = "any"
    VNNI = "vnni"


TARGET_CPU_KEY = "repq_target_cpu"  # the graph's metadata entry holding its TargetCpu


def graph_target_cpu(metadata) -> str:
    """The target CPU a graph (an onnx.ModelProto, or its metadata map as onnxruntime returns it) was
    exported for; 'any' where none is recorded (an unknown word is returned as found, for runners to refuse)."""
    if not isinstance(metadata, dict):
        metadata = {p.key: p.value for p in metadata.metadata_props}
    return metadata.get(TARGET_CPU_KEY, TargetCpu.ANY.value)
