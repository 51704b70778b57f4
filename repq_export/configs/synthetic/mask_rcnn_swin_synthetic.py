# A small Swin Mask R-CNN trained from scratch on the project's synthetic shapes set
# (repq_export.data.synthetic): embed_dim 32, depths (2, 2, 2, 2), FPN width 64, fc 256, 4 classes,
# images resized into (667, 400). Made by tools/train_synthetic.py (train_cfg, optimizer, lr_config
# and runner below are what it reads); shipped as repq_export/assets/mask_rcnn_swin_synthetic.pth.
_base_ = [
    '../_base_/models/mask_rcnn_swin_fpn.py',
    '../_base_/datasets/coco_instance.py',
    '../_base_/default_runtime.py',
]
classes = ('ellipse', 'rectangle', 'triangle', 'star')
num_classes = 4
embed_dim = 32
fpn_width = 64
img_scale = (667, 400)

model = dict(
    backbone=dict(embed_dim=embed_dim, depths=[2, 2, 2, 2], num_heads=[1, 2, 4, 8], window_size=7,
                  drop_path_rate=0.0),
    neck=dict(in_channels=[embed_dim, embed_dim * 2, embed_dim * 4, embed_dim * 8],
              out_channels=fpn_width),
    rpn_head=dict(in_channels=fpn_width, feat_channels=fpn_width),
    roi_head=dict(
        bbox_roi_extractor=dict(out_channels=fpn_width),
        bbox_head=dict(in_channels=fpn_width, fc_out_channels=256, num_classes=num_classes),
        mask_roi_extractor=dict(out_channels=fpn_width),
        mask_head=dict(in_channels=fpn_width, conv_out_channels=fpn_width,
                       num_classes=num_classes)),
    # mmdet 2.11 Mask R-CNN train_cfg; the R-CNN sampler draws 128 RoIs an image instead of 512
    # (a synthetic image holds at most 8 objects, and the CPU budget is tight).
    train_cfg=dict(
        rpn=dict(
            assigner=dict(type='MaxIoUAssigner', pos_iou_thr=0.7, neg_iou_thr=0.3, min_pos_iou=0.3,
                          match_low_quality=True, ignore_iof_thr=-1),
            sampler=dict(type='RandomSampler', num=256, pos_fraction=0.5, neg_pos_ub=-1,
                         add_gt_as_proposals=False),
            allowed_border=-1,
            pos_weight=-1,
            debug=False),
        rpn_proposal=dict(nms_pre=1000, max_per_img=1000, nms=dict(type='nms', iou_threshold=0.7),
                          min_bbox_size=0),
        rcnn=dict(
            assigner=dict(type='MaxIoUAssigner', pos_iou_thr=0.5, neg_iou_thr=0.5, min_pos_iou=0.5,
                          match_low_quality=True, ignore_iof_thr=-1),
            sampler=dict(type='RandomSampler', num=128, pos_fraction=0.25, neg_pos_ub=-1,
                         add_gt_as_proposals=True),
            mask_size=28,
            pos_weight=-1,
            debug=False)))

img_norm_cfg = dict(
    mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375], to_rgb=True)
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='Resize', img_scale=img_scale, keep_ratio=True),
    dict(type='RandomFlip', flip_ratio=0.5),
    dict(type='Normalize', **img_norm_cfg),
    dict(type='Pad', size_divisor=32),
    dict(type='DefaultFormatBundle'),
    dict(type='Collect', keys=['img', 'gt_bboxes', 'gt_labels', 'gt_masks']),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(
        type='MultiScaleFlipAug',
        img_scale=img_scale,
        flip=False,
        transforms=[
            dict(type='Resize', keep_ratio=True),
            dict(type='RandomFlip'),
            dict(type='Normalize', **img_norm_cfg),
            dict(type='Pad', size_divisor=32),
            dict(type='ImageToTensor', keys=['img']),
            dict(type='Collect', keys=['img']),
        ])
]
data = dict(
    samples_per_gpu=4,
    train=dict(ann_file='data/synthetic/annotations/instances_train.json',
               img_prefix='data/synthetic/train/', pipeline=train_pipeline, classes=classes),
    val=dict(ann_file='data/synthetic/annotations/instances_val.json',
             img_prefix='data/synthetic/val/', pipeline=test_pipeline, classes=classes),
    test=dict(ann_file='data/synthetic/annotations/instances_val.json',
              img_prefix='data/synthetic/val/', pipeline=test_pipeline, classes=classes))

# AdamW with no weight decay on norms and the relative position bias tables (as the Swin configs),
# linear warm-up then cosine decay, per iteration.
optimizer = dict(type='AdamW', lr=0.001, betas=(0.9, 0.999), weight_decay=0.05,
                 paramwise_cfg=dict(custom_keys=dict(
                     absolute_pos_embed=dict(decay_mult=0.),
                     relative_position_bias_table=dict(decay_mult=0.),
                     norm=dict(decay_mult=0.))))
optimizer_config = dict(grad_clip=dict(max_norm=10.0, norm_type=2))
lr_config = dict(policy='CosineAnnealing', warmup='linear', warmup_iters=50, warmup_ratio=0.001,
                 min_lr_ratio=0.01, by_epoch=False)
runner = dict(type='IterBasedRunner', max_iters=800)
