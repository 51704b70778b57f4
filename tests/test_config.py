"""The safe config reader (same result as mmengine on our configs, refuses anything else), and
the mapping between configs, ``Arch`` and the built detector."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch

from repq_export.config_source import load_config
from repq_export.errors import UserError
from repq_export.models.arch import ARCHS, Arch, arch_from_config, arch_from_state_dict
from repq_export.models.build import build_detector
from repq_export.models.mmdet_config import config_from_arch
from repq_export.models.test_pipeline import preprocess_settings

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "configs").glob("[!_]*/*.py"))
# the reference's four and the tiny test variants, written to the reference's defaults
REFERENCE_AND_TINY = [c for c in CONFIGS if c.startswith(("configs/swin/", "configs/tiny/"))]
SWIN_T_MASK = ROOT / "configs/swin/mask_rcnn_swin_tiny_patch4_window7_mstrain_480-800_adamw_3x_coco.py"
SWIN_S_CASCADE = ROOT / ("configs/swin/cascade_mask_rcnn_swin_small_patch4_window7_mstrain_"
                         "480-800_giou_4conv1f_adamw_3x_coco.py")


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def test_all_project_configs_are_found():
    assert len([c for c in CONFIGS if c.startswith("configs/swin/")]) == 4
    assert len([c for c in CONFIGS if c.startswith("configs/tiny/")]) >= 2


@pytest.mark.parametrize("rel", CONFIGS)
def test_matches_mmengine(rel):
    mmengine_config = pytest.importorskip("mmengine.config")
    ours = load_config(ROOT / rel)
    theirs = mmengine_config.Config.fromfile(str(ROOT / rel)).to_dict()
    assert ours["model"] == theirs["model"]
    assert ours == theirs


def test_swin_t_mask_rcnn_values():
    cfg = load_config(SWIN_T_MASK)
    model = cfg["model"]
    assert model["type"] == "MaskRCNN"
    assert model["backbone"]["depths"] == [2, 2, 6, 2]
    assert model["backbone"]["num_heads"] == [3, 6, 12, 24]
    assert model["backbone"]["out_indices"] == (0, 1, 2, 3)  # inherited from the base
    assert model["test_cfg"]["rpn"] == dict(nms_pre=1000, max_per_img=1000,
                                            nms=dict(type="nms", iou_threshold=0.7), min_bbox_size=0)
    assert model["test_cfg"]["rcnn"]["score_thr"] == 0.05
    assert cfg["data"]["test"]["ann_file"] == "data/coco/annotations/instances_val2017.json"
    assert cfg["data"]["test"]["pipeline"][1]["img_scale"] == (1333, 800)
    # the child's data.train.pipeline merged into the base data dict, the rest kept
    assert cfg["data"]["train"]["pipeline"][3]["type"] == "AutoAugment"
    assert cfg["data"]["samples_per_gpu"] == 2
    # optimizer=dict(_delete_=True, ...) replaced SGD entirely
    assert cfg["optimizer"]["type"] == "AdamW" and "momentum" not in cfg["optimizer"]
    assert "_delete_" not in cfg["optimizer"]
    assert cfg["lr_config"] == dict(policy="step", warmup="linear", warmup_iters=500,
                                    warmup_ratio=0.001, step=[27, 33])


def test_swin_s_cascade_values():
    model = load_config(SWIN_S_CASCADE)["model"]
    assert model["type"] == "CascadeRCNN"
    assert model["backbone"]["depths"] == [2, 2, 18, 2]
    heads = model["roi_head"]["bbox_head"]
    assert [h["type"] for h in heads] == ["ConvFCBBoxHead"] * 3  # child list replaced the base list
    assert [h["bbox_coder"]["target_stds"][0] for h in heads] == [0.1, 0.05, 0.033]
    assert all(h["reg_class_agnostic"] is False and h["num_shared_convs"] == 4 for h in heads)
    assert model["roi_head"]["mask_head"]["num_convs"] == 4


def test_inheritance_merge_delete_and_expressions(tmp_path):
    write(tmp_path, "base/a.py", """
        root = 'data/'
        model = dict(type='X', inner=dict(a=1, b=2), keep=[1, 2], gone=dict(p=1, q=2))
    """)
    write(tmp_path, "base/b.py", "other = (1, 2)\n")
    child = write(tmp_path, "child.py", """
        \"\"\"A docstring is allowed.\"\"\"
        _base_ = ['base/a.py', './base/b.py']
        width = 16 * 2
        norm = dict(mean=[1.0, 2.0], std=[-3.0, 4.0 / 2])
        model = dict(inner=dict(b=width + 1, c=2 ** 3), keep=[3], gone=dict(_delete_=True, r=3),
                     pipe=dict(type='N', **norm), idx=[10, 20, 30][1], s='ab' + 'cd',
                     d={'k': 1, **norm}, neg=-width, fl=7 // 2, m=7 % 4)
    """)
    cfg = load_config(child)
    assert cfg["width"] == 32 and cfg["other"] == (1, 2) and cfg["root"] == "data/"
    assert cfg["model"] == dict(
        type="X", inner=dict(a=1, b=33, c=8), keep=[3], gone=dict(r=3),
        pipe=dict(type="N", mean=[1.0, 2.0], std=[-3.0, 2.0]), idx=20, s="abcd",
        d=dict(k=1, mean=[1.0, 2.0], std=[-3.0, 2.0]), neg=-32, fl=3, m=3)
    mmengine_config = pytest.importorskip("mmengine.config")
    assert cfg == mmengine_config.Config.fromfile(str(child)).to_dict()


def test_base_as_single_string_and_nested_chain(tmp_path):
    write(tmp_path, "a.py", "x = dict(a=1, b=dict(c=1))\n")
    write(tmp_path, "sub/b.py", "_base_ = '../a.py'\nx = dict(b=dict(d=2))\n")
    top = write(tmp_path, "c.py", "_base_ = 'sub/b.py'\nx = dict(a=5)\n")
    assert load_config(top) == {"x": {"a": 5, "b": {"c": 1, "d": 2}}}


@pytest.mark.parametrize("source, line, fragment", [
    ("import os\n", 1, "unsupported statement 'Import'"),
    ("a = 1\nb = __import__('os').system('true')\n", 2, "unsupported call"),
    ("a = 1\n\nb = open('x')\n", 3, "unsupported call"),
    ("b = dict(x=os.path)\n", 1, "unsupported expression 'Attribute'"),
    ("import math\nb = math.pi\n", 1, "unsupported statement"),
    ("b = (1).__class__\n", 1, "unsupported expression 'Attribute'"),
    ("b = [i for i in range(3)]\n", 1, "unsupported expression 'ListComp'"),
    ("b = lambda: 0\n", 1, "unsupported expression 'Lambda'"),
    ("b = c\n", 1, "name 'c' is not defined"),
    ("def f():\n    pass\n", 1, "unsupported statement 'FunctionDef'"),
    ("x = 1\nx += 1\n", 2, "unsupported statement 'AugAssign'"),
    ("a.b = 1\n", 1, "unsupported assignment target"),
    ("b = 2 ** 1000\n", 1, "exponent too large"),
    ("b = 'x' * 10**9\n", 1, "sequence repetition too large"),
    ("b = 1 / 0\n", 1, "cannot evaluate expression"),
    ("b = dict(**[1])\n", 1, "'**' needs a dict"),
    ("b = '{{ _base_.model }}'\n", 1, "placeholders are not supported"),
    ("b = dict(\n  a=1,\n  c=(\n", 3, "invalid Python syntax"),
])
def test_refuses_code(tmp_path, source, line, fragment):
    path = write(tmp_path, "bad.py", source)
    with pytest.raises(UserError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}:{line}: ")
    assert fragment in message
    assert "\n" not in message


def test_inheritance_errors(tmp_path):
    write(tmp_path, "loop_a.py", "_base_ = 'loop_b.py'\n")
    loop_b = write(tmp_path, "loop_b.py", "_base_ = 'loop_a.py'\n")
    with pytest.raises(UserError, match="circular _base_ inheritance"):
        load_config(loop_b)

    missing = write(tmp_path, "missing.py", "_base_ = ['nope.py']\n")
    with pytest.raises(UserError, match=r"nope\.py: config file not found \(the _base_ of .*missing\.py\)"):
        load_config(missing)

    write(tmp_path, "d1.py", "x = 1\n")
    write(tmp_path, "d2.py", "x = 2\n")
    dup = write(tmp_path, "dup.py", "_base_ = ['d1.py', 'd2.py']\n")
    with pytest.raises(UserError, match=r"keys \['x'\] are defined in more than one _base_ file"):
        load_config(dup)

    write(tmp_path, "scalar.py", "x = 1\n")
    clash = write(tmp_path, "clash.py", "_base_ = 'scalar.py'\nx = dict(a=1)\n")
    with pytest.raises(UserError, match="'x' is a dict in the child config but a int"):
        load_config(clash)

    scoped = write(tmp_path, "scoped.py", "_base_ = 'mmdet::faster_rcnn.py'\n")
    with pytest.raises(UserError, match="package-scoped _base_"):
        load_config(scoped)

    with pytest.raises(UserError, match="config file not found"):
        load_config(tmp_path / "absent.py")
    (tmp_path / "c.yaml").write_text("a: 1\n")
    with pytest.raises(UserError, match=r"only Python \(\.py\)"):
        load_config(tmp_path / "c.yaml")


# ----------------------------------------------------------------------------- config <-> Arch

REFERENCE_ARCH = {
    "configs/swin/mask_rcnn_swin_tiny_patch4_window7_mstrain_480-800_adamw_3x_coco.py": "mask_rcnn_swin_t",
    "configs/swin/mask_rcnn_swin_small_patch4_window7_mstrain_480-800_adamw_3x_coco.py": "mask_rcnn_swin_s",
    "configs/swin/cascade_mask_rcnn_swin_tiny_patch4_window7_mstrain_480-800_giou_4conv1f_adamw_3x_coco.py":
        "cascade_swin_t",
    "configs/swin/cascade_mask_rcnn_swin_small_patch4_window7_mstrain_480-800_giou_4conv1f_adamw_3x_coco.py":
        "cascade_swin_s",
}


@pytest.mark.parametrize("rel", sorted(REFERENCE_ARCH))
def test_reference_configs_have_reference_archs(rel):
    arch = arch_from_config(load_config(ROOT / rel))
    assert arch == ARCHS[REFERENCE_ARCH[rel]]


@pytest.mark.parametrize("rel", REFERENCE_AND_TINY)
def test_config_from_arch_reproduces_the_model_dict(rel):
    """Without a config, a checkpoint gets exactly the reference's model settings."""
    cfg = load_config(ROOT / rel)
    rebuilt = config_from_arch(arch_from_config(cfg))
    assert rebuilt["model"] == cfg["model"]
    assert preprocess_settings(rebuilt).scale == (1333, 800)


@pytest.mark.parametrize("rel", CONFIGS)
def test_arch_read_off_the_state_dict(rel):
    cfg = load_config(ROOT / rel)
    with torch.device("meta"):  # shapes only: full-size models build in a fraction of a second
        detector = build_detector(cfg)
    assert arch_from_state_dict(detector.state_dict()) == arch_from_config(cfg)


def test_arch_fields_of_swin_s_cascade():
    arch = ARCHS["cascade_swin_s"]
    assert (arch.depths, arch.num_heads, arch.embed_dim, arch.window_size) == \
        ((2, 2, 18, 2), (3, 6, 12, 24), 96, 7)
    assert (arch.num_stages, arch.num_shared_convs, arch.num_shared_fcs, arch.conv_norm,
            arch.class_agnostic, arch.fc_out_channels, arch.num_classes) == (3, 4, 1, True, False, 1024, 80)
    assert arch.stage_channels == [96, 192, 384, 768]
    assert Arch("mask_rcnn").differences(Arch("mask_rcnn", embed_dim=16)) == ["embed_dim 96 vs 16"]


def test_built_detector_settings():
    cfg = load_config(ROOT / "configs/tiny/cascade_mask_rcnn_tiny.py")
    det = build_detector(cfg)
    assert not det.training
    assert (det.rpn_head.nms_pre, det.rpn_head.nms_iou, det.rpn_head.max_proposals) == (1000, 0.7, 1000)
    assert det.rpn_head.anchor_generator.strides == [4, 8, 16, 32, 64]
    roi = det.roi_head
    assert (roi.score_thr, roi.nms_iou, roi.max_per_img) == (0.05, 0.5, 100)
    assert [c.stds for c in roi.bbox_coders] == [(0.1, 0.1, 0.2, 0.2), (0.05, 0.05, 0.1, 0.1),
                                                 (0.033, 0.033, 0.067, 0.067)]
    assert len(roi.bbox_head) == 3 and len(roi.mask_head) == 3
    assert roi.bbox_head[0].shared_convs[0].conv.bias is None  # conv + BN, as mmdet's ConvModule
    assert roi.bbox_head[0].fc_cls.out_features == 5 and roi.bbox_head[0].fc_reg.out_features == 16
    keys = det.state_dict().keys()
    assert "roi_head.bbox_head.2.shared_convs.3.bn.num_batches_tracked" in keys
    assert "roi_head.mask_head.1.upsample.weight" in keys
    assert "backbone.layers.3.blocks.1.attn.relative_position_index" in keys


def test_preprocess_settings():
    swin = preprocess_settings(load_config(SWIN_T_MASK))
    assert (swin.scale, swin.mean, swin.std, swin.to_rgb, swin.size_divisor) == \
        ((1333, 800), (123.675, 116.28, 103.53), (58.395, 57.12, 57.375), True, 32)
    assert preprocess_settings(load_config(ROOT / "configs/tiny/mask_rcnn_tiny.py")).scale == (256, 192)


def _edited_tiny(edit) -> dict:
    cfg = load_config(ROOT / "configs/tiny/mask_rcnn_tiny.py")
    edit(cfg)
    return cfg


@pytest.mark.parametrize("edit, fragment", [
    (lambda c: c["model"]["backbone"].update(type="ResNet"),
     "config: model.backbone.type = 'ResNet' is not supported (supported: 'SwinTransformer')"),
    (lambda c: c["model"].update(type="RetinaNet"), "config: model.type = 'RetinaNet' is not supported"),
    (lambda c: c["model"]["backbone"].update(num_heads=[3, 1, 2, 2]),
     "config: model.backbone: SwinTransformer: stage 0 width 16 not divisible by 3 heads"),
    (lambda c: c["model"]["neck"].update(in_channels=[96, 192, 384, 768]),
     "model.neck.in_channels [96, 192, 384, 768] do not match the backbone's widths [16, 32, 64, 128]"),
    (lambda c: c["model"]["neck"].update(num_outs=4), "model.neck.num_outs = 4 is not supported"),
    (lambda c: c["model"]["rpn_head"].update(in_channels=64),
     "model.rpn_head.in_channels (the FPN width) = 64 is not supported (supported: 32)"),
    (lambda c: c["model"]["roi_head"]["mask_head"].update(num_classes=7),
     "bbox_head has 4 classes but mask_head 7"),
    (lambda c: c["model"]["test_cfg"]["rpn"].update(min_bbox_size=2),
     "model.test_cfg.rpn.min_bbox_size = 2 is not supported"),
    (lambda c: c["model"]["test_cfg"].pop("rcnn"), "config: model.test_cfg.rcnn is missing"),
    (lambda c: c["model"]["rpn_head"]["bbox_coder"].update(target_means=[0.1, 0, 0, 0]),
     "model.rpn_head.bbox_coder.target_means must be zeros"),
    (lambda c: c["data"]["test"]["pipeline"][1].update(flip=True),
     "MultiScaleFlipAug.flip = True is not supported"),
])
def test_unsupported_configs(edit, fragment):
    cfg = _edited_tiny(edit)
    with pytest.raises(UserError) as info:
        build_detector(cfg)
        preprocess_settings(cfg)
    assert fragment in str(info.value)
