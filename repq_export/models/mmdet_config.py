"""``Arch`` -> a full mmdet 2.x config dict with the reference's test-time settings.

Used when a checkpoint comes without its config: for the four reference architectures the
``model`` entry equals the reference configs' (less ``train_cfg``).
"""

from __future__ import annotations

from repq_export.data.transforms import PreprocessSettings
from repq_export.errors import UserError
from repq_export.models.arch import KINDS, Arch
from repq_export.models.config_fields import expect_value
from repq_export import reference_settings as ref


def config_from_arch(arch: Arch, preprocess: PreprocessSettings | None = None) -> dict:
    """A full config dict (model and test data) for ``arch`` with the reference's settings.

    For the four reference architectures the ``model`` entry equals the reference configs'
    (less ``train_cfg``); used when a checkpoint comes without a config.
    """
    expect_value(arch.kind, KINDS, "arch.kind")
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
    stage_stds = ref.CASCADE_STDS[: arch.num_stages] if cascade else (ref.BOX_STDS,)
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
    rpn_test = dict(nms_pre=ref.RPN_NMS_PRE, max_per_img=ref.RPN_MAX_PER_IMG,
                    nms=dict(type="nms", iou_threshold=ref.RPN_NMS_IOU), min_bbox_size=0)
    if cascade:  # the cascade configs spell out two more keys, with the same meaning
        rpn_test = dict(nms_across_levels=False, nms_post=ref.RPN_MAX_PER_IMG, **rpn_test)
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
        test_cfg=dict(rpn=rpn_test, rcnn=dict(
            score_thr=ref.RCNN_SCORE_THR, nms=dict(type="nms", iou_threshold=ref.RCNN_NMS_IOU),
            max_per_img=ref.RCNN_MAX_PER_IMG, mask_thr_binary=ref.MASK_THR_BINARY)),
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
