"""Build the plain-torch ``Detector`` from an mmdet 2.x model config (validated on the way)."""

from __future__ import annotations

from typing import Mapping

from repq_export.errors import UserError
from repq_export.models.anchors import AnchorGenerator
from repq_export.models.arch import Arch, arch_from_config
from repq_export.models.bbox_head import ConvFCBBoxHead
from repq_export.models.config_fields import expect_value, get_field, model_section, per_stage
from repq_export.models.detector import Detector
from repq_export.models.fpn import FPN
from repq_export.models.mask_head import FCNMaskHead
from repq_export.models.roi_heads import CascadeRoIHead, RoITestSettings, StandardRoIHead
from repq_export.models.rpn_head import RPNHead
from repq_export.models.swin import SwinTransformer


def build_detector(cfg: Mapping) -> Detector:
    """The ``Detector`` an mmdet 2.x (Cascade) Mask R-CNN Swin config describes, in eval mode."""
    arch = arch_from_config(cfg)
    model = model_section(cfg)
    try:
        backbone = SwinTransformer(
            embed_dim=arch.embed_dim, depths=arch.depths, num_heads=arch.num_heads,
            window_size=arch.window_size, mlp_ratio=arch.mlp_ratio, qkv_bias=arch.qkv_bias,
            patch_size=arch.patch_size)
    except ValueError as exc:  # e.g. a stage width that its head count does not divide
        raise UserError(f"config: model.backbone: {exc}") from None
    neck = FPN(arch.stage_channels, arch.fpn_channels, num_outs=5)
    test_cfg = get_field(model, "test_cfg", "model")
    detector = Detector(backbone, neck, _build_rpn(arch, model["rpn_head"], test_cfg),
                        _build_roi_head(arch, model["roi_head"], test_cfg))
    return detector.eval()


def _stds(head: Mapping, where: str) -> list[float]:
    """target_stds of a head's DeltaXYWHBBoxCoder (means must be zero, as in every reference)."""
    coder = get_field(head, "bbox_coder", where)
    expect_value(get_field(coder, "type", f"{where}.bbox_coder"), ("DeltaXYWHBBoxCoder",), f"{where}.bbox_coder.type")
    if any(float(m) != 0.0 for m in coder.get("target_means", [0.0] * 4)):
        raise UserError(f"config: {where}.bbox_coder.target_means must be zeros")
    expect_value(coder.get("clip_border", True), (True,), f"{where}.bbox_coder.clip_border")
    return [float(s) for s in coder.get("target_stds", [1.0] * 4)]


def _nms_iou(cfg: Mapping, where: str) -> float:
    nms = get_field(cfg, "nms", where)
    expect_value(get_field(nms, "type", f"{where}.nms"), ("nms",), f"{where}.nms.type")
    return float(get_field(nms, "iou_threshold", f"{where}.nms"))


def _build_rpn(arch: Arch, rpn: Mapping, test_cfg: Mapping) -> RPNHead:
    """RPN head with its anchors and the test_cfg.rpn proposal settings."""
    anchors = rpn["anchor_generator"]
    expect_value(get_field(anchors, "type", "model.rpn_head.anchor_generator"), ("AnchorGenerator",),
            "model.rpn_head.anchor_generator.type")
    expect_value(anchors.get("octave_base_scale"), (None,), "model.rpn_head.anchor_generator.octave_base_scale")
    expect_value(anchors.get("center_offset", 0.0), (0.0,), "model.rpn_head.anchor_generator.center_offset")
    generator = AnchorGenerator(
        strides=anchors.get("strides", (4, 8, 16, 32, 64)),
        ratios=anchors.get("ratios", (0.5, 1.0, 2.0)),
        scales=anchors.get("scales", (8,)),
        base_sizes=anchors.get("base_sizes"))
    if generator.num_levels != 5:
        raise UserError("config: model.rpn_head.anchor_generator needs 5 strides (one a FPN level)")
    cfg = get_field(test_cfg, "rpn", "model.test_cfg")
    expect_value(cfg.get("nms_across_levels", False), (False,), "model.test_cfg.rpn.nms_across_levels")
    expect_value(cfg.get("min_bbox_size", 0), (0,), "model.test_cfg.rpn.min_bbox_size")
    return RPNHead(
        in_channels=arch.fpn_channels, feat_channels=arch.rpn_channels, anchor_generator=generator,
        target_stds=_stds(rpn, "model.rpn_head"),
        nms_pre=int(get_field(cfg, "nms_pre", "model.test_cfg.rpn")),
        nms_iou=_nms_iou(cfg, "model.test_cfg.rpn"),
        max_proposals=int(get_field(cfg, "max_per_img", "model.test_cfg.rpn")))


def _roi_settings(roi: Mapping, test_cfg: Mapping) -> RoITestSettings:
    """RoIAlign sizes / strides and the test_cfg.rcnn detection settings."""
    settings = {}
    for name, size_key, expected in (("bbox_roi_extractor", "bbox_roi_size", 7),
                                     ("mask_roi_extractor", "mask_roi_size", 14)):
        ext = get_field(roi, name, "model.roi_head")
        where = f"model.roi_head.{name}"
        expect_value(get_field(ext, "type", where), ("SingleRoIExtractor",), f"{where}.type")
        layer = get_field(ext, "roi_layer", where)
        expect_value(get_field(layer, "type", f"{where}.roi_layer"), ("RoIAlign",), f"{where}.roi_layer.type")
        expect_value(layer.get("output_size"), (expected,), f"{where}.roi_layer.output_size")
        expect_value(layer.get("sampling_ratio", 0), (0,), f"{where}.roi_layer.sampling_ratio")
        expect_value(layer.get("aligned", True), (True,), f"{where}.roi_layer.aligned")
        expect_value(list(ext.get("featmap_strides", [4, 8, 16, 32])), ([4, 8, 16, 32],),
                f"{where}.featmap_strides")
        settings[size_key] = expected
    rcnn = get_field(test_cfg, "rcnn", "model.test_cfg")
    settings.update(
        score_thr=float(get_field(rcnn, "score_thr", "model.test_cfg.rcnn")),
        nms_iou=_nms_iou(rcnn, "model.test_cfg.rcnn"),
        max_per_img=int(get_field(rcnn, "max_per_img", "model.test_cfg.rcnn")))
    return RoITestSettings(**settings)


def _build_roi_head(arch: Arch, roi: Mapping, test_cfg: Mapping) -> StandardRoIHead | CascadeRoIHead:
    """The RoI head: one (Mask R-CNN) or ``num_stages`` (cascade) box and mask heads."""
    bbox_cfgs = per_stage(roi["bbox_head"], arch.num_stages)
    stds = [_stds(h, f"model.roi_head.bbox_head[{i}]") for i, h in enumerate(bbox_cfgs)]
    box_heads = [_box_head(arch) for _ in range(arch.num_stages)]
    mask_heads = [_mask_head(arch) for _ in range(arch.num_stages)]
    settings = _roi_settings(roi, test_cfg)
    if arch.kind == "cascade":
        return CascadeRoIHead(box_heads, mask_heads, stage_stds=stds, settings=settings)
    return StandardRoIHead(box_heads[0], mask_heads[0], target_stds=stds[0], settings=settings)


def _box_head(arch: Arch) -> ConvFCBBoxHead:
    return ConvFCBBoxHead(
        in_channels=arch.fpn_channels, num_shared_convs=arch.num_shared_convs,
        num_shared_fcs=arch.num_shared_fcs, conv_out_channels=arch.conv_out_channels,
        fc_out_channels=arch.fc_out_channels, roi_feat_size=7,
        num_classes=arch.num_classes, reg_class_agnostic=arch.class_agnostic,
        conv_norm=arch.conv_norm)


def _mask_head(arch: Arch) -> FCNMaskHead:
    return FCNMaskHead(
        in_channels=arch.fpn_channels, conv_out_channels=arch.mask_channels,
        num_convs=arch.mask_convs, num_classes=arch.num_classes,
        class_agnostic=arch.mask_class_agnostic)
