"""repq-export: RepQ-ViT quantized Swin detectors to exact QDQ ONNX and TensorRT."""

__version__ = "0.1.0"
