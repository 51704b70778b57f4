"""Training: target assignment and sampling on hand cases, losses on known values, the training
configs, a tiny training run that lowers the loss, and determinism given a seed."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch

from repq_export.config_source import load_config
from repq_export.data.synthetic import make_synthetic_coco
from repq_export.errors import UserError
from repq_export.models.build import build_detector
from repq_export.models.checkpoint import load_checkpoint
from repq_export.models.random_checkpoint import save_checkpoint
from repq_export.training.checkpoint_io import trained_checkpoint
from repq_export.training.data import TrainSet
from repq_export.training.detector_losses import detector_losses
from repq_export.training.init import init_from_checkpoint, init_like_mmdet
from repq_export.training.losses import BoxLossCfg, box_loss, mask_loss, objectness_loss
from repq_export.training.settings import train_cfg_from_config
from repq_export.training.targets import (
    AssignerCfg,
    SamplerCfg,
    assign_max_iou,
    inside_flags,
    mask_targets,
    sample_indices,
    sample_random,
    valid_anchor_flags,
)
from repq_export.training.trainer import batch_schedule, lr_at, seed_everything, train

ROOT = Path(__file__).resolve().parents[1]
MASK_CFG = ROOT / "configs/synthetic/mask_rcnn_swin_synthetic.py"
CASCADE_CFG = ROOT / "configs/synthetic/cascade_mask_rcnn_swin_synthetic.py"
RPN = AssignerCfg(pos_iou_thr=0.7, neg_iou_thr=0.3, min_pos_iou=0.3)
RCNN_STRICT = AssignerCfg(pos_iou_thr=0.5, neg_iou_thr=0.5, min_pos_iou=0.5, match_low_quality=False)


# ----------------------------------------------------------------------------- assignment


def test_assign_thresholds_and_low_quality_match():
    gts = torch.tensor([[0.0, 0.0, 10.0, 10.0], [50.0, 50.0, 60.0, 60.0]])
    boxes = torch.tensor([
        [0.0, 0.0, 10.0, 10.0],  # IoU 1 with gt 0: positive
        [0.0, 0.0, 10.0, 5.0],  # IoU 0.5 with gt 0: between the thresholds, ignored
        [0.0, 0.0, 10.0, 2.0],  # IoU 0.2: negative
        [20.0, 20.0, 30.0, 30.0],  # IoU 0: negative
        [50.0, 50.0, 60.0, 54.0],  # IoU 0.4, gt 1's best box: low-quality positive
    ])
    assert assign_max_iou(boxes, gts, RPN).tolist() == [1, -1, 0, 0, 2]
    no_low_quality = AssignerCfg(0.7, 0.3, 0.3, match_low_quality=False)
    assert assign_max_iou(boxes, gts, no_low_quality).tolist() == [1, -1, 0, 0, -1]
    # a best IoU under min_pos_iou is not promoted
    assert assign_max_iou(boxes, gts, AssignerCfg(0.7, 0.3, 0.45)).tolist() == [1, -1, 0, 0, -1]


def test_assign_ties_go_to_every_best_box_and_later_gts_win():
    gts = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 10.0]])
    boxes = torch.tensor([[0.0, 0.0, 10.0, 4.0], [0.0, 6.0, 10.0, 10.0], [40.0, 40.0, 50.0, 50.0]])
    # both boxes have IoU 0.4 (< pos 0.7) with both gts: all best-box ties go to the last gt
    assert assign_max_iou(boxes, gts, RPN).tolist() == [2, 2, 0]
    only_argmax = AssignerCfg(0.7, 0.3, 0.3, gt_max_assign_all=False)
    assert assign_max_iou(boxes, gts, only_argmax).tolist() == [2, -1, 0]


def test_assign_without_ground_truth_is_all_negative():
    boxes = torch.tensor([[0.0, 0.0, 5.0, 5.0], [1.0, 1.0, 3.0, 3.0]])
    assert assign_max_iou(boxes, torch.zeros(0, 4), RPN).tolist() == [0, 0]


# ----------------------------------------------------------------------------- sampling


def test_sampler_caps_positives_and_fills_with_negatives():
    gen = torch.Generator().manual_seed(0)
    gt_inds = torch.tensor([1] * 10 + [0] * 100 + [-1] * 5)
    pos, neg = sample_indices(gt_inds, SamplerCfg(num=16, pos_fraction=0.25, add_gt_as_proposals=False), gen)
    assert pos.numel() == 4 and neg.numel() == 12
    assert (gt_inds[pos] == 1).all() and (gt_inds[neg] == 0).all()
    assert len(set(pos.tolist())) == 4 and len(set(neg.tolist())) == 12
    few = torch.tensor([2, 0, 0, -1])
    pos, neg = sample_indices(few, SamplerCfg(num=16, pos_fraction=0.25, add_gt_as_proposals=False), gen)
    assert pos.tolist() == [0] and sorted(neg.tolist()) == [1, 2]


def test_sampler_adds_ground_truths_as_positives():
    gen = torch.Generator().manual_seed(0)
    gts = torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 40.0, 40.0]])
    boxes = torch.tensor([[100.0, 100.0, 110.0, 110.0]])
    gt_inds = assign_max_iou(boxes, gts, RCNN_STRICT)
    sampled = sample_random(boxes, gts, gt_inds, SamplerCfg(num=8, pos_fraction=0.5, add_gt_as_proposals=True), gen)
    assert sampled.num_pos == 2
    assert sorted(sampled.pos_gt_inds.tolist()) == [0, 1]
    assert torch.equal(sampled.pos_boxes, gts[sampled.pos_gt_inds])
    assert sampled.is_gt.tolist() == [True, True, False]
    assert torch.equal(sampled.boxes[2], boxes[0])


# ----------------------------------------------------------------------------- anchors and masks


def test_valid_and_inside_anchor_flags():
    # a 4x4 level of stride 8 for an image padded to 16x24: rows < 2 and columns < 3 are valid
    flags = valid_anchor_flags((4, 4), (16, 24), stride=8, num_anchors=2).reshape(4, 4, 2)
    assert flags[:, :, 0].tolist() == [[True, True, True, False]] * 2 + [[False] * 4] * 2
    assert torch.equal(flags[..., 0], flags[..., 1])
    anchors = torch.tensor([[-1.0, 0.0, 5.0, 5.0], [0.0, 0.0, 19.0, 9.0], [0.0, 0.0, 20.0, 9.0]])
    valid = torch.ones(3, dtype=torch.bool)
    assert inside_flags(anchors, valid, (10, 20), 0).tolist() == [False, True, False]
    assert inside_flags(anchors, valid, (10, 20), -1).tolist() == [True, True, True]


def test_mask_targets_cut_out_the_box():
    gt_masks = torch.zeros(2, 40, 40, dtype=torch.uint8)
    gt_masks[1, 10:30, 10:30] = 1  # a 20x20 square, pixels 10..29
    exact = torch.tensor([[10.0, 10.0, 30.0, 30.0]])
    assert mask_targets(exact, torch.tensor([1]), gt_masks, 28).eq(1).all()
    # the box's left half lies left of the square: the target's left half is 0, the right half 1
    shifted = torch.tensor([[0.0, 10.0, 20.0, 30.0]])
    target = mask_targets(shifted, torch.tensor([1]), gt_masks, 28)[0]
    assert target[:, :14].sum() == 0 and target[:, 14:].eq(1).all()
    # the same box on the empty mask 0
    assert mask_targets(exact, torch.tensor([0]), gt_masks, 28).sum() == 0
    assert mask_targets(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), gt_masks, 28).shape == (0, 28, 28)


# ----------------------------------------------------------------------------- losses


def test_losses_on_known_values():
    logits = torch.tensor([0.0, 0.0, 5.0])
    loss = objectness_loss(logits, torch.tensor([1.0, 0.0, 1.0]), torch.tensor([1.0, 1.0, 0.0]), avg_factor=2.0)
    assert loss.item() == pytest.approx(math.log(2))  # two samples of ln 2, the third unweighted
    pred = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    assert box_loss(pred, pred.clone(), BoxLossCfg("GIoULoss", 10.0), 4.0).item() == pytest.approx(0.0, abs=1e-6)
    # disjoint boxes 10x10 at distance 10: IoU 0, enclosing 30x10, GIoU = -(300 - 200) / 300
    far = torch.tensor([[20.0, 0.0, 30.0, 10.0]])
    assert box_loss(pred, far, BoxLossCfg("GIoULoss", 10.0), 4.0).item() == pytest.approx(10 * (1 + 1 / 3) / 4)
    assert box_loss(pred, pred + 1, BoxLossCfg("L1Loss"), 2.0).item() == pytest.approx(2.0)
    # mask loss reads each RoI's own class channel only
    logits = torch.zeros(1, 3, 2, 2)
    logits[0, 1] = 100.0
    assert mask_loss(logits, torch.tensor([1]), torch.ones(1, 2, 2)).item() == pytest.approx(0.0, abs=1e-6)
    assert mask_loss(logits, torch.tensor([0]), torch.ones(1, 2, 2)).item() == pytest.approx(math.log(2))


# ----------------------------------------------------------------------------- configs and schedule


def test_training_configs():
    mask = train_cfg_from_config(load_config(MASK_CFG))
    assert mask.img_scale == (667, 400) and mask.batch_size == 4 and mask.flip_ratio == 0.5
    assert mask.rpn_assigner == RPN and mask.allowed_border == -1
    assert len(mask.stages) == 1 and mask.stages[0].box_loss == BoxLossCfg("L1Loss", 1.0)
    assert mask.no_decay_keys == ("absolute_pos_embed", "relative_position_bias_table", "norm")
    cascade = train_cfg_from_config(load_config(CASCADE_CFG))
    assert [s.assigner.pos_iou_thr for s in cascade.stages] == [0.5, 0.6, 0.7]
    assert [s.loss_weight for s in cascade.stages] == [1.0, 0.5, 0.25]
    assert all(s.box_loss == BoxLossCfg("GIoULoss", 10.0) and s.box_loss.on_decoded_boxes for s in cascade.stages)
    assert not any(s.assigner.match_low_quality for s in cascade.stages)


def test_lr_warmup_then_cosine():
    cfg = train_cfg_from_config(load_config(MASK_CFG))
    assert lr_at(0, cfg, 1000) == pytest.approx(cfg.lr * cfg.warmup_ratio)
    assert lr_at(cfg.warmup_iters, cfg, 1000) == pytest.approx(
        cfg.lr * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * cfg.warmup_iters / 1000))))
    assert lr_at(1000, cfg, 1000) == pytest.approx(cfg.lr * cfg.min_lr_ratio)


def test_init_like_mmdet():
    torch.manual_seed(0)
    detector = build_detector(load_config(CASCADE_CFG))
    init_like_mmdet(detector)
    assert detector.rpn_head.rpn_cls.weight.std().item() == pytest.approx(0.01, rel=0.2)
    for head in detector.roi_head.bbox_head:
        assert head.fc_reg.weight.std().item() == pytest.approx(0.001, rel=0.1)
        assert head.fc_cls.weight.std().item() == pytest.approx(0.01, rel=0.1)
        assert head.fc_reg.bias.abs().max().item() == 0.0
    # the backbone keeps its own initialisation
    assert detector.backbone.layers[0].blocks[0].attn.qkv.weight.std().item() == pytest.approx(0.02, rel=0.2)


def test_init_from_checkpoint_copies_backbone_neck_and_rpn_only(train_dir, tmp_path):
    mask_cfg, _, train_set, mask = tiny_setup(MASK_CFG, train_dir, seed=0)
    path = save_checkpoint(trained_checkpoint(mask, mask_cfg, train_set.classes), tmp_path / "mask.pth")
    cascade = tiny_setup(CASCADE_CFG, train_dir, seed=1)[3]
    before = copy.deepcopy(cascade.state_dict())
    copied = init_from_checkpoint(cascade, path)
    after, source = cascade.state_dict(), mask.state_dict()
    shared = [k for k in after if k.startswith(("backbone.", "neck.", "rpn_head."))]
    assert copied == len(shared) > 90
    assert all(torch.equal(after[k], source[k]) for k in shared)
    assert all(torch.equal(after[k], before[k]) for k in after if k.startswith("roi_head."))
    wide = tiny_setup(MASK_CFG, train_dir, seed=0)[3]
    wide.neck.fpn_convs[0].conv = torch.nn.Conv2d(wide.neck.fpn_convs[0].conv.in_channels, 8, 3)
    with pytest.raises(UserError, match="same shape for neck.fpn_convs.0.conv.weight"):
        init_from_checkpoint(wide, path)
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    for bad in (tmp_path / "missing.pth", tmp_path / "notes.txt"):
        with pytest.raises(UserError, match="cannot read the checkpoint"):
            init_from_checkpoint(wide, bad)


def test_batches_keep_aspect_groups_apart_and_cover_each_epoch():
    groups = [True, False, True, True, False, False, False, True, True]  # 5 landscape, 4 portrait
    schedule = batch_schedule(groups, 2, 0.5, torch.Generator().manual_seed(0))
    epoch = [next(schedule) for _ in range(4)]  # 2 + 2 whole batches; one landscape image left out
    seen = [i for indices, _ in epoch for i in indices]
    assert len(set(seen)) == 8 and all(len({groups[i] for i in indices}) == 1 for indices, _ in epoch)
    assert sum(groups[i] for i in seen) == 4
    again = batch_schedule(groups, 2, 0.5, torch.Generator().manual_seed(0))
    assert [next(again) for _ in range(4)] == epoch  # the generator alone fixes order and flips


# ----------------------------------------------------------------------------- training


def tiny(path: Path) -> dict:
    """The synthetic config shrunk to a few-second size: embed 16, FPN 32, fc 64, few RoIs."""
    cfg = copy.deepcopy(load_config(path))
    model = cfg["model"]
    model["backbone"].update(embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2])
    model["neck"].update(in_channels=[16, 32, 64, 128], out_channels=32)
    model["rpn_head"].update(in_channels=32, feat_channels=32)
    roi = model["roi_head"]
    roi["bbox_roi_extractor"]["out_channels"] = roi["mask_roi_extractor"]["out_channels"] = 32
    heads = roi["bbox_head"] if isinstance(roi["bbox_head"], list) else [roi["bbox_head"]]
    for head in heads:
        head.update(in_channels=32, fc_out_channels=64)
        if "conv_out_channels" in head:
            head["conv_out_channels"] = 32
    roi["mask_head"].update(in_channels=32, conv_out_channels=32)
    rcnn = model["train_cfg"]["rcnn"]
    for stage in rcnn if isinstance(rcnn, list) else [rcnn]:
        stage["sampler"] = dict(stage["sampler"], num=32)
    cfg["data"]["samples_per_gpu"] = 2
    cfg["data"]["train"]["pipeline"][2]["img_scale"] = (128, 96)
    return cfg


@pytest.fixture(scope="module")
def train_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synthetic")
    make_synthetic_coco(out, "train", 2, seed=5)
    return out


def tiny_setup(path: Path, train_dir: Path, seed: int):
    cfg = tiny(path)
    train_cfg = train_cfg_from_config(cfg)
    train_set = TrainSet(train_dir / "annotations/instances_train.json", train_dir / "train",
                         train_cfg.img_scale, (123.675, 116.28, 103.53), (58.395, 57.12, 57.375))
    seed_everything(seed, 1)
    return cfg, train_cfg, train_set, build_detector(cfg)


@pytest.mark.parametrize("path", [MASK_CFG, CASCADE_CFG], ids=["mask_rcnn", "cascade"])
def test_training_steps_lower_the_loss(path, train_dir):
    cfg, train_cfg, train_set, detector = tiny_setup(path, train_dir, seed=0)
    init_like_mmdet(detector)
    train_cfg = type(train_cfg)(**{**vars(train_cfg), "warmup_iters": 0, "min_lr_ratio": 1.0, "flip_ratio": 0.0})
    batch = train_set.batch([0, 1], [False, False])

    def loss_now() -> float:
        detector.train()
        with torch.no_grad():
            return sum(detector_losses(detector, batch, train_cfg, torch.Generator().manual_seed(0)).values()).item()

    before = loss_now()
    log = train(detector, train_set, train_cfg, 6, seed=0, progress=False)
    assert not detector.training  # handed back in eval mode
    after = loss_now()
    assert len(log.losses) == 6 and all(math.isfinite(v) for v in log.losses)
    assert after < 0.8 * before, (before, after)


def test_training_is_deterministic_given_the_seed(train_dir):
    def run(seed: int, **kwargs) -> dict:
        _, train_cfg, train_set, detector = tiny_setup(CASCADE_CFG, train_dir, seed)
        train(detector, train_set, train_cfg, 3, seed, progress=False, **kwargs)
        return detector.state_dict()

    first, again, other = run(0), run(0), run(1)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)
    # BatchNorm statistics of the cascade heads moved, and were saved
    assert first["roi_head.bbox_head.0.shared_convs.0.bn.num_batches_tracked"].item() == 3


def test_resumed_training_equals_an_uninterrupted_run(train_dir, tmp_path):
    state = tmp_path / "run.state"
    stop = RuntimeError("stopped")

    def interrupt(it, log):
        if it == 2:
            raise stop

    def fresh():
        _, train_cfg, train_set, detector = tiny_setup(CASCADE_CFG, train_dir, 0)
        return detector, train_set, train_cfg

    with pytest.raises(RuntimeError):
        train(*fresh(), 3, 0, progress=False, callback=interrupt, state_path=state, state_every=1, state_tag="a")
    assert torch.load(state, weights_only=True)["iteration"] == 2
    with pytest.raises(UserError, match="another run"):
        train(*fresh(), 3, 0, progress=False, state_path=state, state_tag="b")
    resumed, train_set, train_cfg = fresh()
    log = train(resumed, train_set, train_cfg, 3, 0, progress=False, state_path=state, state_tag="a")
    assert len(log.losses) == 3
    straight, train_set, train_cfg = fresh()
    straight_log = train(straight, train_set, train_cfg, 3, 0, progress=False)
    assert log.losses == straight_log.losses
    assert all(torch.equal(v, straight.state_dict()[k]) for k, v in resumed.state_dict().items())


def test_checkpoint_loads_through_the_project_loader(train_dir, tmp_path):
    cfg, _, train_set, detector = tiny_setup(MASK_CFG, train_dir, seed=0)
    ckpt = trained_checkpoint(detector, cfg, train_set.classes, iters=0, seed=0)
    assert list(ckpt["state_dict"]) == list(detector.state_dict())
    assert all(v.dtype in (torch.float32, torch.int64) for v in ckpt["state_dict"].values())
    assert ckpt["meta"]["CLASSES"] == ("ellipse", "rectangle", "triangle", "star")
    assert ckpt["meta"]["mmdet_version"] == "2.11.0"
    config_file = tmp_path / "tiny_mask_rcnn.py"
    config_file.write_text(ckpt["meta"]["config"])
    assert load_config(config_file) == cfg  # the meta's config text is the whole config
    path = save_checkpoint(ckpt, tmp_path / "tiny.pth")
    loaded, info = load_checkpoint(path, config_file)
    assert info.classes == train_set.classes and info.preprocess.scale == (667, 400)
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in detector.state_dict().items())
