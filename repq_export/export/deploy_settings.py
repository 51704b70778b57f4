"""What a deploy config changes in an artifact, as repq.json records it (read back by artifact/artifact_file.py).

Every field of a deploy config either takes effect here or is refused when the file is read
(``repq_export.deploy_config``): the R-CNN post-processing thresholds are written into the graph,
``save_file`` names the ONNX file (and the engine beside it), ``input_shape`` fixes the padded size,
and the onnxruntime session settings travel in the manifest to every runner of the artifact.
"""

from __future__ import annotations

from ..deploy_config import DeployConfig, OnnxRuntimeConfig, OpenVINOConfig, PostProcessing


def post_processing_entry(post: PostProcessing) -> dict:
    """The manifest's record of the post-processing an artifact was exported with."""
    return {"score_threshold": post.score_threshold, "iou_threshold": post.iou_threshold,
            "keep_top_k": post.keep_top_k, "mask_thr_binary": post.mask_thr_binary}


def backend_entry(deploy: DeployConfig) -> dict:
    """The manifest's record of the backend settings that runners of the artifact use."""
    backend = deploy.backend
    if isinstance(backend, OnnxRuntimeConfig):
        return {"type": backend.type, "providers": list(backend.providers),
                "graph_optimization_level": backend.graph_optimization_level, "target_cpu": backend.target_cpu}
    if isinstance(backend, OpenVINOConfig):
        return {"type": backend.type, "device": backend.device, "graph_form": backend.graph_form,
                "inference_precision": backend.inference_precision, "roi_nan_guard": True,
                "log_sqrt2_lowering": backend.log_sqrt2_lowering, "static_shapes": backend.static_shapes}
    return {"type": backend.type, "fp16_mode": backend.fp16_mode}
