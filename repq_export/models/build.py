"""Build the plain-torch ``Detector`` from an mmdet 2.x model config, or from an architecture
read off a checkpoint's state dict.

``Arch`` is everything about the network's *structure* that a state dict determines (widths,
depths, head layout, class count). Test-time *settings* that leave no trace in the weights
(box-coder stds, NMS thresholds, anchors, preprocessing) come from the config;
``config_from_arch`` supplies the reference configs' values when there is no config file.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, fields
from typing import Any, Mapping, Sequence

from torch import Tensor

from repq_export.errors import UserError
from repq_export.models.anchors import AnchorGenerator
from repq_export.models.bbox_head import ConvFCBBoxHead
from repq_export.models.detector import Detector
from repq_export.models.fpn import FPN
from repq_export.models.mask_head import FCNMaskHead
from repq_export.models.roi_heads import CascadeRoIHead, StandardRoIHead
from repq_export.models.rpn_head import RPNHead
from repq_export.models.swin import SwinTransformer

KINDS = ("mask_rcnn", "cascade")
CASCADE_STDS = ([0.1, 0.1, 0.2, 0.2], [0.05, 0.05, 0.1, 0.1], [0.033, 0.033, 0.067, 0.067])
IMG_NORM = dict(mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375], to_rgb=True)


@dataclass(frozen=True)
class Arch:
    """The structure of a Swin (Cascade) Mask R-CNN: what a checkpoint's keys and shapes fix.

    Every cascade stage has the same box-head and mask-head structure (true of the reference).
    """

    kind: str  # 'mask_rcnn' | 'cascade'
    embed_dim: int = 96
    depths: tuple[int, ...] = (2, 2, 6, 2)
    num_heads: tuple[int, ...] = (3, 6, 12, 24)
    window_size: int = 7
    mlp_ratio: float = 4.0
    patch_size: int = 4
    qkv_bias: bool = True
    fpn_channels: int = 256
    rpn_channels: int = 256
    num_anchors: int = 3
    num_classes: int = 80
    num_stages: int = 1
    num_shared_convs: int = 0  # box head: 0 = Shared2FC, 4 = 4conv1fc
    num_shared_fcs: int = 2
    conv_out_channels: int = 256
    conv_norm: bool = False  # BatchNorm after the box head's shared convs
    fc_out_channels: int = 1024
    class_agnostic: bool = False  # box regression shared by all classes
    mask_convs: int = 4
    mask_channels: int = 256
    mask_class_agnostic: bool = False

    @property
    def stage_channels(self) -> list[int]:
        """Backbone output widths, one a stage (embed_dim doubled each stage)."""
        return [self.embed_dim * 2**i for i in range(len(self.depths))]

    def differences(self, other: Arch) -> list[str]:
        """'field: ours vs theirs' for every field that differs (for mismatch messages)."""
        return [f"{f.name} {getattr(self, f.name)} vs {getattr(other, f.name)}"
                for f in fields(self) if getattr(self, f.name) != getattr(other, f.name)]


_SWIN_T = dict(depths=(2, 2, 6, 2))
_SWIN_S = dict(depths=(2, 2, 18, 2))
_CASCADE = dict(kind="cascade", num_stages=3, num_shared_convs=4, num_shared_fcs=1, conv_norm=True)
# The four architectures of the reference (RepQ-ViT detection / Swin-Transformer-Object-Detection).
ARCHS: dict[str, Arch] = {
    "mask_rcnn_swin_t": Arch(kind="mask_rcnn", **_SWIN_T),
    "mask_rcnn_swin_s": Arch(kind="mask_rcnn", **_SWIN_S),
    "cascade_swin_t": Arch(**_CASCADE, **_SWIN_T),
    "cascade_swin_s": Arch(**_CASCADE, **_SWIN_S),
}


@dataclass(frozen=True)
class PreprocessSettings:
    """Test-pipeline settings; the field names are ``repq_export.data.transforms.preprocess``'s
    keyword arguments (``preprocess(img, **vars(settings))``)."""

    scale: tuple[int, int] = (1333, 800)
    mean: tuple[float, float, float] = (123.675, 116.28, 103.53)
    std: tuple[float, float, float] = (58.395, 57.12, 57.375)
    to_rgb: bool = True
    size_divisor: int = 32
    pad_to: tuple[int, int] | None = None  # (h, w) of a static graph's input; None: pad to size_divisor


# ----------------------------------------------------------------------------- config -> Arch


def _get(d: Mapping, key: str, where: str, default: Any = ...) -> Any:
    """``d[key]`` or a UserError naming the config path that lacks it."""
    if not isinstance(d, Mapping):
        raise UserError(f"config: {where} must be a dict, got {type(d).__name__}")
    if key in d:
        return d[key]
    if default is ...:
        raise UserError(f"config: {where}.{key} is missing")
    return default


def _expect(value: Any, allowed: Sequence[Any], what: str) -> None:
    if value not in allowed:
        raise UserError(f"config: {what} = {value!r} is not supported (supported: "
                        f"{', '.join(repr(a) for a in allowed)})")


def _model(cfg: Mapping) -> Mapping:
    model = _get(cfg, "model", "config")
    if not isinstance(model, Mapping):
        raise UserError("config: model must be a dict")
    return model


def _as_list(value: Any, n: int) -> list:
    """A head given once (a dict) is shared by all ``n`` stages, as in mmdet's CascadeRoIHead."""
    return list(value) if isinstance(value, (list, tuple)) else [value] * n


def arch_from_config(cfg: Mapping) -> Arch:
    """Structure of the detector described by an mmdet 2.x config dict (validated)."""
    model = _model(cfg)
    _expect(_get(model, "type", "model"), ("MaskRCNN", "CascadeRCNN"), "model.type")
    kind = "cascade" if model["type"] == "CascadeRCNN" else "mask_rcnn"
    backbone = _get(model, "backbone", "model")
    _expect(_get(backbone, "type", "model.backbone"), ("SwinTransformer",), "model.backbone.type")
    _expect(backbone.get("ape", False), (False,), "model.backbone.ape")
    _expect(backbone.get("patch_norm", True), (True,), "model.backbone.patch_norm")
    _expect(tuple(backbone.get("out_indices", (0, 1, 2, 3))), ((0, 1, 2, 3),),
            "model.backbone.out_indices")
    _expect(backbone.get("qk_scale", None), (None,), "model.backbone.qk_scale")
    swin = dict(
        embed_dim=int(backbone.get("embed_dim", 96)),
        depths=tuple(int(d) for d in backbone.get("depths", (2, 2, 6, 2))),
        num_heads=tuple(int(h) for h in backbone.get("num_heads", (3, 6, 12, 24))),
        window_size=int(backbone.get("window_size", 7)),
        mlp_ratio=float(backbone.get("mlp_ratio", 4.0)),
        patch_size=int(backbone.get("patch_size", 4)),
        qkv_bias=bool(backbone.get("qkv_bias", True)),
    )
    if len(swin["depths"]) != 4 or len(swin["num_heads"]) != 4:
        raise UserError("config: model.backbone needs 4 stages (depths and num_heads of length 4)")

    neck = _get(model, "neck", "model")
    _expect(_get(neck, "type", "model.neck"), ("FPN",), "model.neck.type")
    _expect(neck.get("num_outs"), (5,), "model.neck.num_outs")
    _expect(neck.get("start_level", 0), (0,), "model.neck.start_level")
    _expect(neck.get("add_extra_convs", False), (False,), "model.neck.add_extra_convs")
    expected_in = [swin["embed_dim"] * 2**i for i in range(4)]
    if list(_get(neck, "in_channels", "model.neck")) != expected_in:
        raise UserError(f"config: model.neck.in_channels {list(neck['in_channels'])} do not match "
                        f"the backbone's widths {expected_in}")
    fpn = int(_get(neck, "out_channels", "model.neck"))

    rpn = _get(model, "rpn_head", "model")
    _expect(_get(rpn, "type", "model.rpn_head"), ("RPNHead",), "model.rpn_head.type")
    anchors = _get(rpn, "anchor_generator", "model.rpn_head")
    num_anchors = len(anchors.get("scales", [8])) * len(anchors.get("ratios", [0.5, 1.0, 2.0]))

    roi = _get(model, "roi_head", "model")
    _expect(_get(roi, "type", "model.roi_head"),
            ("CascadeRoIHead",) if kind == "cascade" else ("StandardRoIHead",), "model.roi_head.type")
    num_stages = int(roi.get("num_stages", 3)) if kind == "cascade" else 1
    bbox_heads = _as_list(_get(roi, "bbox_head", "model.roi_head"), num_stages)
    mask_heads = _as_list(_get(roi, "mask_head", "model.roi_head"), num_stages)
    if len(bbox_heads) != num_stages or len(mask_heads) != num_stages:
        raise UserError(f"config: model.roi_head needs {num_stages} bbox_head and mask_head entries")
    heads = {_box_head_arch(h, f"model.roi_head.bbox_head[{i}]") for i, h in enumerate(bbox_heads)}
    masks = {_mask_head_arch(h, f"model.roi_head.mask_head[{i}]") for i, h in enumerate(mask_heads)}
    if len(heads) != 1 or len(masks) != 1:
        raise UserError("config: cascade stages with different head structures are not supported")
    head, mask = heads.pop(), masks.pop()
    if head["num_classes"] != mask["num_classes"] and not mask["mask_class_agnostic"]:
        raise UserError(f"config: bbox_head has {head['num_classes']} classes but mask_head "
                        f"{mask['num_classes']}")
    mask.pop("num_classes")
    for where, part, key in (("model.rpn_head", rpn, "in_channels"),
                             ("model.roi_head.bbox_roi_extractor", roi.get("bbox_roi_extractor", {}), "out_channels"),
                             ("model.roi_head.mask_roi_extractor", roi.get("mask_roi_extractor", {}), "out_channels"),
                             ("model.roi_head.bbox_head", bbox_heads[0], "in_channels"),
                             ("model.roi_head.mask_head", mask_heads[0], "in_channels")):
        _expect(part.get(key, fpn), (fpn,), f"{where}.{key} (the FPN width)")
    return Arch(kind=kind, **swin, fpn_channels=fpn,
                rpn_channels=int(rpn.get("feat_channels", fpn)), num_anchors=num_anchors,
                num_stages=num_stages, **dict(head), **dict(mask))


class _FrozenDict(dict):
    """A hashable dict, so identical per-stage head structures collapse in a set."""

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(tuple(sorted(self.items())))


def _box_head_arch(head: Mapping, where: str) -> _FrozenDict:
    """Structure fields of one R-CNN box head config."""
    _expect(_get(head, "type", where), ("Shared2FCBBoxHead", "ConvFCBBoxHead"), f"{where}.type")
    shared2fc = head["type"] == "Shared2FCBBoxHead"
    for key in ("num_cls_convs", "num_cls_fcs", "num_reg_convs", "num_reg_fcs"):
        _expect(head.get(key, 0), (0,), f"{where}.{key}")
    _expect(head.get("with_avg_pool", False), (False,), f"{where}.with_avg_pool")
    num_convs = 0 if shared2fc else int(head.get("num_shared_convs", 0))
    norm_cfg = head.get("norm_cfg")
    if norm_cfg is not None:
        _expect(_get(norm_cfg, "type", f"{where}.norm_cfg"), ("BN", "SyncBN"), f"{where}.norm_cfg.type")
    _expect(head.get("roi_feat_size", 7), (7,), f"{where}.roi_feat_size")
    return _FrozenDict(
        num_classes=int(head.get("num_classes", 80)),
        num_shared_convs=num_convs,
        num_shared_fcs=2 if shared2fc else int(head.get("num_shared_fcs", 0)),
        conv_out_channels=int(head.get("conv_out_channels", 256)),
        conv_norm=norm_cfg is not None and num_convs > 0,
        fc_out_channels=int(head.get("fc_out_channels", 1024)),
        class_agnostic=bool(head.get("reg_class_agnostic", False)),
    )


def _mask_head_arch(head: Mapping, where: str) -> _FrozenDict:
    """Structure fields of one FCN mask head config."""
    _expect(_get(head, "type", where), ("FCNMaskHead",), f"{where}.type")
    _expect(head.get("upsample_cfg", {"type": "deconv"}).get("type"), ("deconv",),
            f"{where}.upsample_cfg.type")
    _expect(head.get("roi_feat_size", 14), (14,), f"{where}.roi_feat_size")
    return _FrozenDict(
        num_classes=int(head.get("num_classes", 80)),
        mask_convs=int(head.get("num_convs", 4)),
        mask_channels=int(head.get("conv_out_channels", 256)),
        mask_class_agnostic=bool(head.get("class_agnostic", False)),
    )


# ----------------------------------------------------------------------------- config -> Detector


def build_detector(cfg: Mapping) -> Detector:
    """The ``Detector`` an mmdet 2.x (Cascade) Mask R-CNN Swin config describes, in eval mode."""
    arch = arch_from_config(cfg)
    model = _model(cfg)
    try:
        backbone = SwinTransformer(
            embed_dim=arch.embed_dim, depths=arch.depths, num_heads=arch.num_heads,
            window_size=arch.window_size, mlp_ratio=arch.mlp_ratio, qkv_bias=arch.qkv_bias,
            patch_size=arch.patch_size)
    except ValueError as exc:  # e.g. a stage width that its head count does not divide
        raise UserError(f"config: model.backbone: {exc}") from None
    neck = FPN(arch.stage_channels, arch.fpn_channels, num_outs=5)
    test_cfg = _get(model, "test_cfg", "model")
    detector = Detector(backbone, neck, _build_rpn(arch, model["rpn_head"], test_cfg),
                        _build_roi_head(arch, model["roi_head"], test_cfg))
    return detector.eval()


def _stds(head: Mapping, where: str) -> list[float]:
    """target_stds of a head's DeltaXYWHBBoxCoder (means must be zero, as in every reference)."""
    coder = _get(head, "bbox_coder", where)
    _expect(_get(coder, "type", f"{where}.bbox_coder"), ("DeltaXYWHBBoxCoder",), f"{where}.bbox_coder.type")
    if any(float(m) != 0.0 for m in coder.get("target_means", [0.0] * 4)):
        raise UserError(f"config: {where}.bbox_coder.target_means must be zeros")
    _expect(coder.get("clip_border", True), (True,), f"{where}.bbox_coder.clip_border")
    return [float(s) for s in coder.get("target_stds", [1.0] * 4)]


def _nms_iou(cfg: Mapping, where: str) -> float:
    nms = _get(cfg, "nms", where)
    _expect(_get(nms, "type", f"{where}.nms"), ("nms",), f"{where}.nms.type")
    return float(_get(nms, "iou_threshold", f"{where}.nms"))


def _build_rpn(arch: Arch, rpn: Mapping, test_cfg: Mapping) -> RPNHead:
    """RPN head with its anchors and the test_cfg.rpn proposal settings."""
    anchors = rpn["anchor_generator"]
    _expect(_get(anchors, "type", "model.rpn_head.anchor_generator"), ("AnchorGenerator",),
            "model.rpn_head.anchor_generator.type")
    _expect(anchors.get("octave_base_scale"), (None,), "model.rpn_head.anchor_generator.octave_base_scale")
    _expect(anchors.get("center_offset", 0.0), (0.0,), "model.rpn_head.anchor_generator.center_offset")
    generator = AnchorGenerator(
        strides=anchors.get("strides", (4, 8, 16, 32, 64)),
        ratios=anchors.get("ratios", (0.5, 1.0, 2.0)),
        scales=anchors.get("scales", (8,)),
        base_sizes=anchors.get("base_sizes"))
    if generator.num_levels != 5:
        raise UserError("config: model.rpn_head.anchor_generator needs 5 strides (one a FPN level)")
    cfg = _get(test_cfg, "rpn", "model.test_cfg")
    _expect(cfg.get("nms_across_levels", False), (False,), "model.test_cfg.rpn.nms_across_levels")
    _expect(cfg.get("min_bbox_size", 0), (0,), "model.test_cfg.rpn.min_bbox_size")
    return RPNHead(
        in_channels=arch.fpn_channels, feat_channels=arch.rpn_channels, anchor_generator=generator,
        target_stds=_stds(rpn, "model.rpn_head"),
        nms_pre=int(_get(cfg, "nms_pre", "model.test_cfg.rpn")),
        nms_iou=_nms_iou(cfg, "model.test_cfg.rpn"),
        max_proposals=int(_get(cfg, "max_per_img", "model.test_cfg.rpn")))


def _roi_settings(roi: Mapping, test_cfg: Mapping) -> dict:
    """RoIAlign sizes / strides and the test_cfg.rcnn detection settings."""
    settings = {}
    for name, size_key, expected in (("bbox_roi_extractor", "bbox_roi_size", 7),
                                     ("mask_roi_extractor", "mask_roi_size", 14)):
        ext = _get(roi, name, "model.roi_head")
        where = f"model.roi_head.{name}"
        _expect(_get(ext, "type", where), ("SingleRoIExtractor",), f"{where}.type")
        layer = _get(ext, "roi_layer", where)
        _expect(_get(layer, "type", f"{where}.roi_layer"), ("RoIAlign",), f"{where}.roi_layer.type")
        _expect(layer.get("output_size"), (expected,), f"{where}.roi_layer.output_size")
        _expect(layer.get("sampling_ratio", 0), (0,), f"{where}.roi_layer.sampling_ratio")
        _expect(layer.get("aligned", True), (True,), f"{where}.roi_layer.aligned")
        _expect(list(ext.get("featmap_strides", [4, 8, 16, 32])), ([4, 8, 16, 32],),
                f"{where}.featmap_strides")
        settings[size_key] = expected
    rcnn = _get(test_cfg, "rcnn", "model.test_cfg")
    settings.update(
        score_thr=float(_get(rcnn, "score_thr", "model.test_cfg.rcnn")),
        nms_iou=_nms_iou(rcnn, "model.test_cfg.rcnn"),
        max_per_img=int(_get(rcnn, "max_per_img", "model.test_cfg.rcnn")))
    return settings


def _build_roi_head(arch: Arch, roi: Mapping, test_cfg: Mapping) -> StandardRoIHead | CascadeRoIHead:
    """The RoI head: one (Mask R-CNN) or ``num_stages`` (cascade) box and mask heads."""
    bbox_cfgs = _as_list(roi["bbox_head"], arch.num_stages)
    stds = [_stds(h, f"model.roi_head.bbox_head[{i}]") for i, h in enumerate(bbox_cfgs)]
    box_heads = [_box_head(arch) for _ in range(arch.num_stages)]
    mask_heads = [_mask_head(arch) for _ in range(arch.num_stages)]
    settings = _roi_settings(roi, test_cfg)
    if arch.kind == "cascade":
        return CascadeRoIHead(box_heads, mask_heads, stage_stds=stds, **settings)
    return StandardRoIHead(box_heads[0], mask_heads[0], target_stds=stds[0], **settings)


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


def preprocess_settings(cfg: Mapping) -> PreprocessSettings:
    """Resize scale, normalization and padding of the config's test pipeline.

    Reads ``data.test.pipeline`` (else ``test_pipeline``); refuses test-time augmentation and
    anything but keep-ratio resize, since the deployed network sees exactly one image.
    """
    data = cfg.get("data")
    test = data.get("test") if isinstance(data, Mapping) else None
    pipeline = test.get("pipeline") if isinstance(test, Mapping) else None
    if pipeline is None:
        pipeline = cfg.get("test_pipeline")
    if not isinstance(pipeline, (list, tuple)):
        raise UserError("config: no test pipeline (data.test.pipeline or test_pipeline)")
    steps: list[Mapping] = []
    scale = None
    for step in pipeline:
        if isinstance(step, Mapping) and step.get("type") == "MultiScaleFlipAug":
            _expect(step.get("flip", False), (False,), "test pipeline MultiScaleFlipAug.flip")
            scale = step.get("img_scale")
            steps.extend(step.get("transforms", []))
        elif isinstance(step, Mapping):
            steps.append(step)
    by_type = {s.get("type"): s for s in steps}
    resize, norm, pad = by_type.get("Resize"), by_type.get("Normalize"), by_type.get("Pad")
    if resize is None or norm is None or pad is None:
        raise UserError("config: the test pipeline needs Resize, Normalize and Pad steps")
    _expect(resize.get("keep_ratio", True), (True,), "test pipeline Resize.keep_ratio")
    scale = resize.get("img_scale", scale)
    if isinstance(scale, list) and len(scale) == 1:
        scale = scale[0]
    if not (isinstance(scale, (list, tuple)) and len(scale) == 2
            and all(isinstance(v, int) and v > 0 for v in scale)):
        raise UserError(f"config: test pipeline img_scale {scale!r} must be one (long, short) pair")
    return PreprocessSettings(
        scale=(int(scale[0]), int(scale[1])),
        mean=tuple(float(m) for m in _get(norm, "mean", "test pipeline Normalize")),
        std=tuple(float(s) for s in _get(norm, "std", "test pipeline Normalize")),
        to_rgb=bool(norm.get("to_rgb", True)),
        size_divisor=int(_get(pad, "size_divisor", "test pipeline Pad")))


# ----------------------------------------------------------------------------- Arch -> config


def config_from_arch(arch: Arch, preprocess: PreprocessSettings | None = None) -> dict:
    """A full config dict (model and test data) for ``arch`` with the reference's settings.

    For the four reference architectures the ``model`` entry equals the reference configs'
    (less ``train_cfg``); used when a checkpoint comes without a config.
    """
    _expect(arch.kind, KINDS, "arch.kind")
    pre = preprocess or PreprocessSettings()
    norm = dict(mean=list(pre.mean), std=list(pre.std), to_rgb=pre.to_rgb)
    test_pipeline = [
        dict(type="LoadImageFromFile"),
        dict(type="MultiScaleFlipAug", img_scale=tuple(pre.scale), flip=False, transforms=[
            dict(type="Resize", keep_ratio=True),
            dict(type="RandomFlip"),
            dict(type="Normalize", **norm),
            dict(type="Pad", size_divisor=pre.size_divisor),
            dict(type="ImageToTensor", keys=["img"]),
            dict(type="Collect", keys=["img"]),
        ]),
    ]
    return dict(
        model=_model_dict(arch),
        img_norm_cfg=norm,
        test_pipeline=test_pipeline,
        data=dict(test=dict(type="CocoDataset",
                            ann_file="data/coco/annotations/instances_val2017.json",
                            img_prefix="data/coco/val2017/", pipeline=test_pipeline)),
    )


def _roi_extractor_dict(arch: Arch, size: int) -> dict:
    return dict(type="SingleRoIExtractor",
                roi_layer=dict(type="RoIAlign", output_size=size, sampling_ratio=0),
                out_channels=arch.fpn_channels, featmap_strides=[4, 8, 16, 32])


def _model_dict(arch: Arch) -> dict:
    """The mmdet 2.x ``model`` dict of ``arch`` with the reference's test-time settings."""
    if arch.num_anchors != 3:
        raise UserError(f"arch: {arch.num_anchors} RPN anchors per location; without a config "
                        "only the reference's 3 (scale 8, ratios 0.5, 1, 2) are known")
    cascade = arch.kind == "cascade"
    stage_stds = CASCADE_STDS[: arch.num_stages] if cascade else ([0.1, 0.1, 0.2, 0.2],)
    bbox_heads = [_bbox_head_dict(arch, list(stds)) for stds in stage_stds]
    mask_head = dict(type="FCNMaskHead", num_convs=arch.mask_convs, in_channels=arch.fpn_channels,
                     conv_out_channels=arch.mask_channels, num_classes=arch.num_classes,
                     loss_mask=dict(type="CrossEntropyLoss", use_mask=True, loss_weight=1.0))
    if arch.mask_class_agnostic:
        mask_head["class_agnostic"] = True
    roi_head = dict(type="CascadeRoIHead", num_stages=arch.num_stages,
                    stage_loss_weights=[1, 0.5, 0.25][: arch.num_stages]) if cascade \
        else dict(type="StandardRoIHead")
    roi_head.update(bbox_roi_extractor=_roi_extractor_dict(arch, 7),
                    bbox_head=bbox_heads if cascade else bbox_heads[0],
                    mask_roi_extractor=_roi_extractor_dict(arch, 14), mask_head=mask_head)
    rpn_test = dict(nms_pre=1000, max_per_img=1000, nms=dict(type="nms", iou_threshold=0.7),
                    min_bbox_size=0)
    if cascade:
        rpn_test = dict(nms_across_levels=False, nms_pre=1000, nms_post=1000, max_per_img=1000,
                        nms=dict(type="nms", iou_threshold=0.7), min_bbox_size=0)
    return dict(
        type="CascadeRCNN" if cascade else "MaskRCNN",
        pretrained=None,
        backbone=dict(
            type="SwinTransformer", embed_dim=arch.embed_dim, depths=list(arch.depths),
            num_heads=list(arch.num_heads), window_size=arch.window_size, mlp_ratio=arch.mlp_ratio,
            qkv_bias=arch.qkv_bias, qk_scale=None, drop_rate=0.0, attn_drop_rate=0.0,
            drop_path_rate=0.2, ape=False, patch_norm=True, out_indices=(0, 1, 2, 3),
            use_checkpoint=False, **({} if arch.patch_size == 4 else {"patch_size": arch.patch_size})),
        neck=dict(type="FPN", in_channels=arch.stage_channels, out_channels=arch.fpn_channels,
                  num_outs=5),
        rpn_head=dict(
            type="RPNHead", in_channels=arch.fpn_channels, feat_channels=arch.rpn_channels,
            anchor_generator=dict(type="AnchorGenerator", scales=[8], ratios=[0.5, 1.0, 2.0],
                                  strides=[4, 8, 16, 32, 64]),
            bbox_coder=dict(type="DeltaXYWHBBoxCoder", target_means=[0.0] * 4, target_stds=[1.0] * 4),
            loss_cls=dict(type="CrossEntropyLoss", use_sigmoid=True, loss_weight=1.0),
            loss_bbox=dict(type="SmoothL1Loss", beta=1.0 / 9.0, loss_weight=1.0) if cascade
            else dict(type="L1Loss", loss_weight=1.0)),
        roi_head=roi_head,
        test_cfg=dict(rpn=rpn_test, rcnn=dict(score_thr=0.05, nms=dict(type="nms", iou_threshold=0.5),
                                             max_per_img=100, mask_thr_binary=0.5)),
    )


def _bbox_head_dict(arch: Arch, stds: list[float]) -> dict:
    coder = dict(type="DeltaXYWHBBoxCoder", target_means=[0.0] * 4, target_stds=stds)
    loss_cls = dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0)
    if arch.num_shared_convs == 0 and arch.num_shared_fcs == 2:
        loss_bbox = dict(type="SmoothL1Loss", beta=1.0, loss_weight=1.0) if arch.kind == "cascade" \
            else dict(type="L1Loss", loss_weight=1.0)
        return dict(type="Shared2FCBBoxHead", in_channels=arch.fpn_channels,
                    fc_out_channels=arch.fc_out_channels, roi_feat_size=7,
                    num_classes=arch.num_classes, bbox_coder=coder,
                    reg_class_agnostic=arch.class_agnostic, loss_cls=loss_cls, loss_bbox=loss_bbox)
    head = dict(type="ConvFCBBoxHead", num_shared_convs=arch.num_shared_convs,
                num_shared_fcs=arch.num_shared_fcs, in_channels=arch.fpn_channels,
                conv_out_channels=arch.conv_out_channels, fc_out_channels=arch.fc_out_channels,
                roi_feat_size=7, num_classes=arch.num_classes, bbox_coder=coder,
                reg_class_agnostic=arch.class_agnostic, reg_decoded_bbox=True)
    if arch.conv_norm:
        head["norm_cfg"] = dict(type="SyncBN", requires_grad=True)
    head.update(loss_cls=loss_cls, loss_bbox=dict(type="GIoULoss", loss_weight=10.0))
    return head


# ----------------------------------------------------------------------------- state dict -> Arch

_BLOCK_KEY = re.compile(r"backbone\.layers\.(\d+)\.blocks\.(\d+)\.")


def _count(sd: Mapping[str, Tensor], prefix: str) -> int:
    """Number of consecutive indices ``prefix{i}.`` present among the keys."""
    n = 0
    while any(k.startswith(f"{prefix}{n}.") for k in sd):
        n += 1
    return n


def _shape(sd: Mapping[str, Tensor], key: str) -> tuple[int, ...]:
    if key not in sd:
        raise UserError(f"state_dict lacks '{key}'")
    return tuple(sd[key].shape)


def arch_from_state_dict(sd: Mapping[str, Tensor]) -> Arch:
    """Read the architecture off a Swin-Det-layout state dict's keys and shapes.

    Raises UserError('state_dict ...') when the keys are not those of a Swin (Cascade) Mask R-CNN;
    the caller prefixes the file name.
    """
    embed_dim, _, patch, _ = _shape(sd, "backbone.patch_embed.proj.weight")
    depths_by_stage: dict[int, int] = {}
    for key in sd:
        m = _BLOCK_KEY.match(key)
        if m:
            i, j = int(m.group(1)), int(m.group(2))
            depths_by_stage[i] = max(depths_by_stage.get(i, 0), j + 1)
    num_stages = len(depths_by_stage)
    if num_stages != 4 or sorted(depths_by_stage) != [0, 1, 2, 3]:
        raise UserError(f"state_dict has Swin blocks in stages {sorted(depths_by_stage)}, expected 0..3")
    depths = tuple(depths_by_stage[i] for i in range(4))
    table_rows, heads0 = _shape(sd, "backbone.layers.0.blocks.0.attn.relative_position_bias_table")
    window = (math.isqrt(table_rows) + 1) // 2
    num_heads = tuple(_shape(sd, f"backbone.layers.{i}.blocks.0.attn.relative_position_bias_table")[1]
                      for i in range(4))
    hidden = _shape(sd, "backbone.layers.0.blocks.0.mlp.fc1.weight")[0]

    cascade = "roi_head.bbox_head.0.fc_cls.weight" in sd
    if not cascade and "roi_head.bbox_head.fc_cls.weight" not in sd:
        raise UserError("state_dict has no R-CNN box head (roi_head.bbox_head...fc_cls)")
    stages = _count(sd, "roi_head.bbox_head.") if cascade else 1
    box = "roi_head.bbox_head.0." if cascade else "roi_head.bbox_head."
    mask = "roi_head.mask_head.0." if cascade else "roi_head.mask_head."
    num_classes = _shape(sd, box + "fc_cls.weight")[0] - 1
    num_convs = _count(sd, box + "shared_convs.")
    num_fcs = _count(sd, box + "shared_fcs.")
    conv_out = _shape(sd, box + "shared_convs.0.conv.weight")[0] if num_convs else 256
    mask_convs = _count(sd, mask + "convs.")
    return Arch(
        kind="cascade" if cascade else "mask_rcnn",
        embed_dim=embed_dim, depths=depths, num_heads=num_heads, window_size=window,
        mlp_ratio=hidden / embed_dim, patch_size=patch,
        qkv_bias="backbone.layers.0.blocks.0.attn.qkv.bias" in sd,
        fpn_channels=_shape(sd, "neck.lateral_convs.0.conv.weight")[0],
        rpn_channels=_shape(sd, "rpn_head.rpn_conv.weight")[0],
        num_anchors=_shape(sd, "rpn_head.rpn_cls.weight")[0],
        num_classes=num_classes, num_stages=stages,
        num_shared_convs=num_convs, num_shared_fcs=num_fcs, conv_out_channels=conv_out,
        conv_norm=f"{box}shared_convs.0.bn.weight" in sd,
        fc_out_channels=_shape(sd, box + "fc_cls.weight")[1],
        class_agnostic=_shape(sd, box + "fc_reg.weight")[0] == 4 and num_classes > 1,
        mask_convs=mask_convs,
        mask_channels=_shape(sd, mask + "upsample.weight")[1],
        mask_class_agnostic=_shape(sd, mask + "conv_logits.weight")[0] == 1 and num_classes > 1,
    )
