"""The detector an artifact computes: its post-processing settings, and its fake-quant model rebuilt
from the opened artifact (no checkpoint, no calibration), the reference side of every parity check."""

from __future__ import annotations

from torch import nn

from ..deploy_config import PostProcessing
from ..errors import UserError
from ..models.build import build_detector
from ..quant.state import apply_quant_state
from .artifact_file import Artifact
from .manifest_check import MANIFEST


def apply_post_processing(detector: nn.Module, post: PostProcessing) -> None:
    """Set the RoI head's test settings (score threshold, NMS IoU, detections kept) that the graph carries."""
    head = detector.roi_head
    head.score_thr = float(post.score_threshold)
    head.nms_iou = float(post.iou_threshold)
    head.max_per_img = int(post.keep_top_k)


def fake_quant_model(artifact: Artifact) -> nn.Module:
    """The artifact's fake-quant detector, built from its model_config and the quant.pth it opened."""
    try:
        detector = build_detector(dict(artifact.model_config))
    except UserError as err:  # the model config's own 'config: <field>: ...' messages
        raise UserError(f"{artifact.path / MANIFEST}: model_config: {str(err).removeprefix('config: ')}") from None
    apply_post_processing(detector, artifact.post_processing)
    return apply_quant_state(detector, artifact.quant_manifest, artifact.quant_state, artifact.quant_path,
                             artifact.w_bits, artifact.a_bits)
