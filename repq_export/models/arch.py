"""``Arch``: the structure of a Swin (Cascade) Mask R-CNN, read from an mmdet 2.x config or off a
checkpoint's state dict.

``Arch`` is everything a state dict determines (widths, depths, head layout, class count).
Test-time settings that leave no trace in the weights (box-coder stds, NMS thresholds, anchors,
preprocessing) come from the config, or from ``mmdet_config.config_from_arch`` without one.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, fields
from typing import Mapping

from torch import Tensor

from repq_export.errors import UserError
from repq_export.models.config_fields import expect_value, get_field, model_section, per_stage

KINDS = ("mask_rcnn", "cascade")


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


# ----------------------------------------------------------------------------- config -> Arch


def arch_from_config(cfg: Mapping) -> Arch:
    """Structure of the detector described by an mmdet 2.x config dict (validated)."""
    model = model_section(cfg)
    expect_value(get_field(model, "type", "model"), ("MaskRCNN", "CascadeRCNN"), "model.type")
    kind = "cascade" if model["type"] == "CascadeRCNN" else "mask_rcnn"
    backbone = get_field(model, "backbone", "model")
    expect_value(get_field(backbone, "type", "model.backbone"), ("SwinTransformer",), "model.backbone.type")
    expect_value(backbone.get("ape", False), (False,), "model.backbone.ape")
    expect_value(backbone.get("patch_norm", True), (True,), "model.backbone.patch_norm")
    expect_value(tuple(backbone.get("out_indices", (0, 1, 2, 3))), ((0, 1, 2, 3),),
            "model.backbone.out_indices")
    expect_value(backbone.get("qk_scale", None), (None,), "model.backbone.qk_scale")
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

    neck = get_field(model, "neck", "model")
    expect_value(get_field(neck, "type", "model.neck"), ("FPN",), "model.neck.type")
    expect_value(neck.get("num_outs"), (5,), "model.neck.num_outs")
    expect_value(neck.get("start_level", 0), (0,), "model.neck.start_level")
    expect_value(neck.get("add_extra_convs", False), (False,), "model.neck.add_extra_convs")
    expected_in = [swin["embed_dim"] * 2**i for i in range(4)]
    if list(get_field(neck, "in_channels", "model.neck")) != expected_in:
        raise UserError(f"config: model.neck.in_channels {list(neck['in_channels'])} do not match "
                        f"the backbone's widths {expected_in}")
    fpn = int(get_field(neck, "out_channels", "model.neck"))

    rpn = get_field(model, "rpn_head", "model")
    expect_value(get_field(rpn, "type", "model.rpn_head"), ("RPNHead",), "model.rpn_head.type")
    anchors = get_field(rpn, "anchor_generator", "model.rpn_head")
    num_anchors = len(anchors.get("scales", [8])) * len(anchors.get("ratios", [0.5, 1.0, 2.0]))

    roi = get_field(model, "roi_head", "model")
    expect_value(get_field(roi, "type", "model.roi_head"),
            ("CascadeRoIHead",) if kind == "cascade" else ("StandardRoIHead",), "model.roi_head.type")
    num_stages = int(roi.get("num_stages", 3)) if kind == "cascade" else 1
    bbox_heads = per_stage(get_field(roi, "bbox_head", "model.roi_head"), num_stages)
    mask_heads = per_stage(get_field(roi, "mask_head", "model.roi_head"), num_stages)
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
        expect_value(part.get(key, fpn), (fpn,), f"{where}.{key} (the FPN width)")
    return Arch(kind=kind, **swin, fpn_channels=fpn,
                rpn_channels=int(rpn.get("feat_channels", fpn)), num_anchors=num_anchors,
                num_stages=num_stages, **dict(head), **dict(mask))


class _FrozenDict(dict):
    """A hashable dict, so identical per-stage head structures collapse in a set."""

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(tuple(sorted(self.items())))


def _box_head_arch(head: Mapping, where: str) -> _FrozenDict:
    """Structure fields of one R-CNN box head config."""
    expect_value(get_field(head, "type", where), ("Shared2FCBBoxHead", "ConvFCBBoxHead"), f"{where}.type")
    shared2fc = head["type"] == "Shared2FCBBoxHead"
    for key in ("num_cls_convs", "num_cls_fcs", "num_reg_convs", "num_reg_fcs"):
        expect_value(head.get(key, 0), (0,), f"{where}.{key}")
    expect_value(head.get("with_avg_pool", False), (False,), f"{where}.with_avg_pool")
    num_convs = 0 if shared2fc else int(head.get("num_shared_convs", 0))
    norm_cfg = head.get("norm_cfg")
    if norm_cfg is not None:
        expect_value(get_field(norm_cfg, "type", f"{where}.norm_cfg"), ("BN", "SyncBN"), f"{where}.norm_cfg.type")
    expect_value(head.get("roi_feat_size", 7), (7,), f"{where}.roi_feat_size")
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
    expect_value(get_field(head, "type", where), ("FCNMaskHead",), f"{where}.type")
    expect_value(head.get("upsample_cfg", {"type": "deconv"}).get("type"), ("deconv",),
            f"{where}.upsample_cfg.type")
    expect_value(head.get("roi_feat_size", 14), (14,), f"{where}.roi_feat_size")
    return _FrozenDict(
        num_classes=int(head.get("num_classes", 80)),
        mask_convs=int(head.get("num_convs", 4)),
        mask_channels=int(head.get("conv_out_channels", 256)),
        mask_class_agnostic=bool(head.get("class_agnostic", False)),
    )


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
