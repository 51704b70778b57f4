"""Training settings read from an mmdet 2.x config: ``model.train_cfg``, the heads' ``loss_bbox``,
the train pipeline's scale and flip ratio, ``data.samples_per_gpu``, ``optimizer``,
``optimizer_config``, ``lr_config`` and ``runner``.

Only what ``repq_export.training`` implements is accepted; anything else is a UserError, so a
config never silently trains something other than what it says.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from repq_export.errors import UserError
from repq_export.training.losses import BoxLossCfg
from repq_export.training.targets import AssignerCfg, SamplerCfg


@dataclass(frozen=True)
class StageCfg:
    """One R-CNN stage: its assigner, sampler, mask target size, box loss and loss weight."""

    assigner: AssignerCfg
    sampler: SamplerCfg
    box_loss: BoxLossCfg
    mask_size: int = 28
    loss_weight: float = 1.0


@dataclass(frozen=True)
class TrainCfg:
    """Everything the trainer needs besides the model itself."""

    rpn_assigner: AssignerCfg
    rpn_sampler: SamplerCfg
    rpn_box_loss: BoxLossCfg
    allowed_border: int
    stages: tuple[StageCfg, ...]
    img_scale: tuple[int, int] = (1333, 800)
    flip_ratio: float = 0.5
    batch_size: int = 2
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.05
    no_decay_keys: tuple[str, ...] = ()
    grad_clip: float | None = None
    warmup_iters: int = 0
    warmup_ratio: float = 0.001
    min_lr_ratio: float = 0.0
    max_iters: int = 1000


def _get(d: Any, key: str, where: str, default: Any = ...) -> Any:
    if not isinstance(d, Mapping):
        raise UserError(f"config: {where} must be a dict")
    if key in d:
        return d[key]
    if default is ...:
        raise UserError(f"config: {where}.{key} is missing (needed for training)")
    return default


def _assigner(d: Mapping, where: str) -> AssignerCfg:
    if _get(d, "type", where) != "MaxIoUAssigner":
        raise UserError(f"config: {where}.type must be MaxIoUAssigner")
    if _get(d, "ignore_iof_thr", where, -1) >= 0:
        raise UserError(f"config: {where}.ignore_iof_thr is not supported (use -1)")
    return AssignerCfg(
        pos_iou_thr=float(_get(d, "pos_iou_thr", where)),
        neg_iou_thr=float(_get(d, "neg_iou_thr", where)),
        min_pos_iou=float(_get(d, "min_pos_iou", where, 0.0)),
        match_low_quality=bool(_get(d, "match_low_quality", where, True)),
        gt_max_assign_all=bool(_get(d, "gt_max_assign_all", where, True)),
    )


def _sampler(d: Mapping, where: str) -> SamplerCfg:
    if _get(d, "type", where) != "RandomSampler":
        raise UserError(f"config: {where}.type must be RandomSampler")
    if _get(d, "neg_pos_ub", where, -1) >= 0:
        raise UserError(f"config: {where}.neg_pos_ub is not supported (use -1)")
    return SamplerCfg(
        num=int(_get(d, "num", where)),
        pos_fraction=float(_get(d, "pos_fraction", where)),
        add_gt_as_proposals=bool(_get(d, "add_gt_as_proposals", where, True)),
    )


def _box_loss(head: Mapping, where: str) -> BoxLossCfg:
    loss = _get(head, "loss_bbox", where, dict(type="L1Loss", loss_weight=1.0))
    cfg = BoxLossCfg(type=str(_get(loss, "type", f"{where}.loss_bbox")),
                     weight=float(loss.get("loss_weight", 1.0)), beta=float(loss.get("beta", 1.0)))
    if cfg.on_decoded_boxes != bool(head.get("reg_decoded_bbox", False)):
        raise UserError(f"config: {where}: GIoULoss goes with reg_decoded_bbox=True (and only it)")
    return cfg


def _pipeline_step(pipeline: Any, kind: str) -> Mapping:
    for step in pipeline if isinstance(pipeline, (list, tuple)) else ():
        if isinstance(step, Mapping) and step.get("type") == kind:
            return step
    raise UserError(f"config: data.train.pipeline has no {kind} step")


def _no_decay_keys(optimizer: Mapping) -> tuple[str, ...]:
    custom = optimizer.get("paramwise_cfg", {}).get("custom_keys", {})
    return tuple(k for k, v in custom.items() if float(v.get("decay_mult", 1.0)) == 0.0)


def train_cfg_from_config(cfg: Mapping) -> TrainCfg:
    """The ``TrainCfg`` of a (Cascade) Mask R-CNN config with a ``model.train_cfg``."""
    model = _get(cfg, "model", "config")
    train = _get(model, "train_cfg", "model")
    rpn = _get(train, "rpn", "model.train_cfg")
    roi = _get(model, "roi_head", "model")
    cascade = roi.get("type") == "CascadeRoIHead"
    num_stages = int(roi.get("num_stages", 3)) if cascade else 1
    rcnn = _get(train, "rcnn", "model.train_cfg")
    rcnn_list = list(rcnn) if isinstance(rcnn, (list, tuple)) else [rcnn] * num_stages
    heads = roi["bbox_head"] if isinstance(roi["bbox_head"], (list, tuple)) else [roi["bbox_head"]] * num_stages
    weights = roi.get("stage_loss_weights", [1.0] * num_stages) if cascade else [1.0]
    if not len(rcnn_list) == len(heads) == len(weights) == num_stages:
        raise UserError(f"config: {num_stages} R-CNN stages need as many train_cfg.rcnn entries, "
                        "bbox heads and stage_loss_weights")
    stages = tuple(
        StageCfg(
            assigner=_assigner(_get(r, "assigner", f"model.train_cfg.rcnn[{i}]"), f"model.train_cfg.rcnn[{i}].assigner"),
            sampler=_sampler(_get(r, "sampler", f"model.train_cfg.rcnn[{i}]"), f"model.train_cfg.rcnn[{i}].sampler"),
            box_loss=_box_loss(h, f"model.roi_head.bbox_head[{i}]"),
            mask_size=int(r.get("mask_size", 28)),
            loss_weight=float(w),
        )
        for i, (r, h, w) in enumerate(zip(rcnn_list, heads, weights))
    )

    data = _get(cfg, "data", "config")
    pipeline = _get(_get(data, "train", "data"), "pipeline", "data.train")
    resize = _pipeline_step(pipeline, "Resize")
    scale = resize.get("img_scale")
    if not (isinstance(scale, (list, tuple)) and len(scale) == 2 and all(isinstance(v, int) for v in scale)):
        raise UserError(f"config: data.train.pipeline Resize.img_scale {scale!r} must be one (long, short) pair")
    flip = _pipeline_step(pipeline, "RandomFlip")

    optimizer = _get(cfg, "optimizer", "config")
    if _get(optimizer, "type", "optimizer") != "AdamW":
        raise UserError("config: optimizer.type must be AdamW")
    lr_config = _get(cfg, "lr_config", "config")
    if _get(lr_config, "policy", "lr_config") != "CosineAnnealing":
        raise UserError("config: lr_config.policy must be CosineAnnealing")
    if lr_config.get("warmup") not in (None, "linear"):
        raise UserError("config: lr_config.warmup must be linear (or absent)")
    clip = (cfg.get("optimizer_config") or {}).get("grad_clip")
    runner = _get(cfg, "runner", "config")
    if _get(runner, "type", "runner") != "IterBasedRunner":
        raise UserError("config: runner.type must be IterBasedRunner")
    return TrainCfg(
        rpn_assigner=_assigner(_get(rpn, "assigner", "model.train_cfg.rpn"), "model.train_cfg.rpn.assigner"),
        rpn_sampler=_sampler(_get(rpn, "sampler", "model.train_cfg.rpn"), "model.train_cfg.rpn.sampler"),
        rpn_box_loss=_box_loss(_get(model, "rpn_head", "model"), "model.rpn_head"),
        allowed_border=int(rpn.get("allowed_border", -1)),
        stages=stages,
        img_scale=(int(scale[0]), int(scale[1])),
        flip_ratio=float(flip.get("flip_ratio", 0.0)),
        batch_size=int(_get(data, "samples_per_gpu", "data")),
        lr=float(_get(optimizer, "lr", "optimizer")),
        betas=tuple(float(b) for b in optimizer.get("betas", (0.9, 0.999))),
        weight_decay=float(optimizer.get("weight_decay", 0.01)),
        no_decay_keys=_no_decay_keys(optimizer),
        grad_clip=float(clip["max_norm"]) if clip else None,
        warmup_iters=int(lr_config.get("warmup_iters", 0)) if lr_config.get("warmup") else 0,
        warmup_ratio=float(lr_config.get("warmup_ratio", 0.001)),
        min_lr_ratio=float(lr_config.get("min_lr_ratio", 0.0)),
        max_iters=int(_get(runner, "max_iters", "runner")),
    )
