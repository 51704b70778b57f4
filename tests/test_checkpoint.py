"""Checkpoint reading: both key layouts, strict loading, safe unpickling, one-line errors."""

from __future__ import annotations

import hashlib
import os
import pickle
import sys
import types
from pathlib import Path

import numpy as np

import pytest
import torch
from torch import nn

from repq_export.config_source import load_config
from repq_export.errors import UserError
from repq_export.models.arch import arch_from_config
from repq_export.models.build import build_detector
from repq_export.models.checkpoint import load_checkpoint, read_checkpoint
from repq_export.models.key_layout import concat_order, mmdet3_to_swin_det, swin_det_to_mmdet3
from repq_export.models.random_checkpoint import (COCO_CLASSES, config_text, make_random_checkpoint,
                                                  save_checkpoint)
from repq_export.models.swin import PatchMerging

ROOT = Path(__file__).resolve().parents[1]
TINY = {"mask": ROOT / "configs/tiny/mask_rcnn_tiny.py",
        "cascade": ROOT / "configs/tiny/cascade_mask_rcnn_tiny.py"}
CLASSES = ("ellipse", "rectangle", "triangle", "star")


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[tuple[str, str], Path]:
    """Tiny random checkpoints: (kind, layout) -> file, the same weights in both layouts."""
    folder = tmp_path_factory.mktemp("ckpt")
    out = {}
    for kind, cfg_path in TINY.items():
        cfg = load_config(cfg_path)
        for layout in ("swin-det", "mmdet3"):
            out[kind, layout] = save_checkpoint(make_random_checkpoint(cfg, layout, seed=7),
                                                folder / f"{kind}_{layout}.pth")
    return out


@pytest.fixture(scope="module")
def image() -> tuple[torch.Tensor, torch.Tensor]:
    """A padded 192x256 input whose valid part is 180x250 (both not multiples of 7 or 32)."""
    gen = torch.Generator().manual_seed(0)
    return torch.randn(1, 3, 192, 256, generator=gen), torch.tensor([180.0, 250.0])


def run(detector, image):
    with torch.no_grad():
        return detector(*image)


def raw(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def expect_error(path, fragment: str, config=None) -> str:
    with pytest.raises(UserError) as info:
        load_checkpoint(path, config)
    message = str(info.value)
    assert message.startswith(f"{path}: ") or (config is not None and message.startswith(f"{config}: "))
    assert fragment in message, message
    assert "\n" not in message
    return message


# ----------------------------------------------------------------------------- layouts


@pytest.mark.parametrize("kind", ["mask", "cascade"])
def test_both_layouts_give_identical_detections(files, image, kind):
    swin_det, info_a = load_checkpoint(files[kind, "swin-det"])
    mmdet3, info_b = load_checkpoint(files[kind, "mmdet3"])
    assert (info_a.layout, info_b.layout) == ("swin-det", "mmdet3")
    a, b = run(swin_det, image), run(mmdet3, image)
    assert 0 < a[0].shape[0] <= 100  # random weights still give detections
    assert a[3].shape == (a[0].shape[0], 28, 28) and 0.0 < float(a[3].mean()) < 1.0
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_mmdet3_file_uses_mmdet3_names_and_unfold_order(files):
    sd3 = raw(files["mask", "mmdet3"])["state_dict"]
    sd2 = raw(files["mask", "swin-det"])["state_dict"]
    for key in ("backbone.patch_embed.projection.weight",
                "backbone.stages.0.blocks.1.attn.w_msa.relative_position_bias_table",
                "backbone.stages.0.blocks.1.attn.w_msa.relative_position_index",
                "backbone.stages.3.blocks.0.ffn.layers.0.0.weight",
                "backbone.stages.3.blocks.0.ffn.layers.1.bias",
                "backbone.stages.2.downsample.reduction.weight",
                "neck.lateral_convs.0.conv.weight", "roi_head.mask_head.upsample.weight"):
        assert key in sd3, key
    assert not any(k.startswith("backbone.layers.") for k in sd3)
    assert len(sd3) == len(sd2)
    w2 = sd2["backbone.layers.0.downsample.reduction.weight"]  # (32, 64): C = 16
    w3 = sd3["backbone.stages.0.downsample.reduction.weight"]
    assert not torch.equal(w2, w3)
    # Swin input channel 16 + c is neighbour (row 1, col 0) channel c; mmdet3 puts it at 4c + 2.
    assert torch.equal(w2[:, 16 + 5], w3[:, 4 * 5 + 2])
    assert torch.equal(w2[:, 32 + 5], w3[:, 4 * 5 + 1])  # (row 0, col 1)
    assert torch.equal(mmdet3_to_swin_det(swin_det_to_mmdet3(sd2))["backbone.layers.0.downsample.norm.bias"],
                       sd2["backbone.layers.0.downsample.norm.bias"])


def test_concat_order_small_case():
    # C = 2: swin [x0c0, x0c1, x1c0, x1c1, x2c0, x2c1, x3c0, x3c1], unfold [c0: x0 x2 x1 x3, c1: ...]
    assert concat_order(8).tolist() == [0, 4, 2, 6, 1, 5, 3, 7]


def test_patch_merging_in_mmdet3_order_equals_swin(files):
    """mmdet 3.x merges patches with nn.Unfold; with its weights it must equal our PatchMerging."""
    sd3 = raw(files["mask", "mmdet3"])["state_dict"]
    sd2 = raw(files["mask", "swin-det"])["state_dict"]
    C, H, W = 32, 5, 6
    ours = PatchMerging(C)
    ours.load_state_dict({k.split("downsample.")[1]: v for k, v in sd2.items()
                          if k.startswith("backbone.layers.1.downsample.")})
    norm, reduction = nn.LayerNorm(4 * C), nn.Linear(4 * C, 2 * C, bias=False)
    norm.weight.data = sd3["backbone.stages.1.downsample.norm.weight"]
    norm.bias.data = sd3["backbone.stages.1.downsample.norm.bias"]
    reduction.weight.data = sd3["backbone.stages.1.downsample.reduction.weight"]
    x = torch.randn(1, H * W, C, generator=torch.Generator().manual_seed(1))
    grid = nn.functional.pad(x.reshape(1, H, W, C).permute(0, 3, 1, 2), (0, W % 2, 0, H % 2))
    unfolded = nn.Unfold(2, stride=2)(grid).transpose(1, 2)  # (1, L, 4C) channel-major
    with torch.no_grad():
        expected = reduction(norm(unfolded))
        got = ours(x, H, W)
    assert got.shape == (1, 3 * 3, 2 * C)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- what is loaded


def test_strict_load_and_info(files, image):
    path = files["cascade", "swin-det"]
    detector, info = load_checkpoint(path, TINY["cascade"])
    stored = raw(path)["state_dict"]
    loaded = detector.state_dict()
    assert list(loaded) == list(stored)  # every key, BN num_batches_tracked included
    assert all(torch.equal(loaded[k], stored[k]) for k in stored)
    assert loaded["roi_head.bbox_head.2.shared_convs.3.bn.num_batches_tracked"] == 1000
    assert info.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert info.classes == CLASSES
    assert info.arch == arch_from_config(load_config(TINY["cascade"]))
    assert info.arch.num_stages == 3 and info.arch.conv_norm and info.arch.num_classes == 4
    assert info.preprocess.scale == (256, 192)  # from the config's test pipeline
    assert info.meta["mmdet_version"] == "2.11.0"
    assert not detector.training
    # without a config: architecture read off the weights, the reference's test settings
    inferred, info2 = load_checkpoint(path)
    assert info2.config_path is None and info2.preprocess.scale == (1333, 800)
    for x, y in zip(run(detector, image), run(inferred, image)):
        assert torch.equal(x, y)


def test_embedded_config_text_reads_back(files, tmp_path):
    meta = raw(files["mask", "swin-det"])["meta"]
    (tmp_path / "embedded.py").write_text(meta["config"])
    assert load_config(tmp_path / "embedded.py") == load_config(TINY["mask"])
    cfg = load_config(ROOT / "configs/swin/mask_rcnn_swin_small_patch4_window7_mstrain_480-800_adamw_3x_coco.py")
    (tmp_path / "swin_s.py").write_text(config_text(cfg))
    assert load_config(tmp_path / "swin_s.py") == cfg


def test_module_prefix_and_bare_state_dict(files, tmp_path):
    reference = raw(files["mask", "swin-det"])["state_dict"]
    ckpt = raw(files["mask", "mmdet3"])
    prefixed = {"meta": ckpt["meta"], "state_dict": {f"module.{k}": v for k, v in ckpt["state_dict"].items()}}
    for name, obj in (("prefixed.pth", prefixed), ("bare.pth", ckpt["state_dict"])):
        detector, info = load_checkpoint(save_checkpoint(obj, tmp_path / name))
        assert info.layout == "mmdet3"
        loaded = detector.state_dict()
        assert loaded.keys() == reference.keys()
        assert all(torch.equal(loaded[k], reference[k]) for k in reference)
    assert load_checkpoint(tmp_path / "bare.pth")[1].classes is None


def test_mmdet3_class_names_from_dataset_meta(files):
    assert load_checkpoint(files["mask", "mmdet3"])[1].classes == CLASSES


def test_default_class_names():
    cfg = load_config(TINY["mask"])
    cfg["data"]["test"].pop("classes")
    cfg.pop("classes")
    assert make_random_checkpoint(cfg)["meta"]["CLASSES"] == ("class0", "class1", "class2", "class3")
    assert len(COCO_CLASSES) == 80 and COCO_CLASSES[-1] == "toothbrush"


# ----------------------------------------------------------------------------- safe unpickling


def test_foreign_objects_in_meta_are_not_imported(files, tmp_path):
    """mmengine-style meta (a class from a module we do not have, numpy arrays) still loads."""
    module = types.ModuleType("not_installed_logging")

    class HistoryBuffer:
        def __init__(self):
            self.values = np.arange(3.0)

    HistoryBuffer.__module__ = module.__name__
    HistoryBuffer.__qualname__ = "HistoryBuffer"
    module.HistoryBuffer = HistoryBuffer
    ckpt = raw(files["mask", "swin-det"])
    ckpt["meta"]["hub"] = HistoryBuffer()
    ckpt["meta"]["array"] = np.ones((2, 2))
    ckpt["message_hub"] = {"log": HistoryBuffer()}
    sys.modules[module.__name__] = module
    try:
        path = save_checkpoint(ckpt, tmp_path / "foreign.pth")
    finally:
        del sys.modules[module.__name__]
    with pytest.raises(Exception):  # plain weights-only loading refuses this file
        torch.load(path, weights_only=True)
    detector, info = load_checkpoint(path)
    assert module.__name__ not in sys.modules
    assert "hub" not in info.meta and "array" not in info.meta
    assert info.classes == CLASSES and info.meta["epoch"] == 36


def test_code_in_checkpoint_is_refused(files, tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    ckpt = raw(files["mask", "swin-det"])
    ckpt["meta"]["evil"] = Evil()
    path = save_checkpoint(ckpt, tmp_path / "evil.pth")
    message = expect_error(path, "refused: its pickle would call os.system while loading")
    assert "torch.save({'state_dict'" in message and "weights_only" not in message
    assert not marker.exists()


# ----------------------------------------------------------------------------- bad inputs


def edited(files, tmp_path, name: str, edit) -> Path:
    """A copy of the tiny Mask R-CNN checkpoint with its state dict edited."""
    ckpt = raw(files["mask", "swin-det"])
    edit(ckpt["state_dict"])
    return save_checkpoint(ckpt, tmp_path / name)


def test_missing_file(tmp_path):
    expect_error(tmp_path / "absent.pth", "checkpoint file not found")


@pytest.mark.parametrize("content, detail", [
    (b"", "empty file, 0 bytes"),
    (b"hello, not a checkpoint\n", "unknown content"),
    (b"PK\x03\x04broken zip", "zip archive is truncated or corrupt"),
    (b'{"state_dict": {}}', "a JSON or text file"),
    (pickle.dumps({"state_dict": {"a": [1]}}, protocol=5), "plain Python pickle"),
    (pickle.dumps({"state_dict": {"a": [1]}}, protocol=2), "plain Python pickle"),
])
def test_not_a_torch_file(tmp_path, content, detail):
    """Each kind of wrong file is named as what it is; never torch's advice to turn weights_only off."""
    path = tmp_path / "junk.pth"
    path.write_bytes(content)
    message = expect_error(path, "not a PyTorch checkpoint")
    assert detail in message and "weights_only" not in message and "EOFError" not in message


@pytest.mark.parametrize("legacy", [False, True])
def test_truncated(files, tmp_path, legacy):
    whole = tmp_path / "whole.pth"
    torch.save(raw(files["mask", "swin-det"]), whole, _use_new_zipfile_serialization=not legacy)
    data = whole.read_bytes()
    path = tmp_path / "truncated.pth"
    path.write_bytes(data[: len(data) * 2 // 3])
    expect_error(path, "not a PyTorch checkpoint, or truncated")


@pytest.mark.parametrize("obj, fragment", [
    (torch.ones(3), "not a detector checkpoint (holds a Tensor"),
    ({"epoch": 3, "optimizer": {}}, "not a detector checkpoint (no 'state_dict' entry; top-level keys: epoch, optimizer)"),
    ({"state_dict": {}}, "state_dict is empty"),
    ({"state_dict": {"a": torch.ones(1), "b": 3}}, "non-tensor state_dict entries: b"),
    ({"state_dict": {"fc.weight": torch.ones(2, 2)}}, "not a detector checkpoint (no backbone.* keys"),
    ({"state_dict": {"backbone.conv1.weight": torch.ones(64, 3, 7, 7),
                     "backbone.layer1.0.conv1.weight": torch.ones(64, 64, 1, 1),
                     "rpn_head.rpn_conv.weight": torch.ones(1), "roi_head.bbox_head.fc_cls.weight": torch.ones(1)}},
     "another architecture: the backbone is not a Swin Transformer (has keys like 'backbone.conv1.weight')"),
])
def test_not_a_detector_checkpoint(tmp_path, obj, fragment):
    path = tmp_path / "other.pth"
    torch.save(obj, path)
    expect_error(path, fragment)


def test_single_stage_detector_is_another_architecture(files, tmp_path):
    def to_retinanet(sd):
        for k in [k for k in sd if k.startswith(("rpn_head.", "roi_head."))]:
            sd["bbox_head.retina_cls." + k.split(".")[-1]] = sd.pop(k)
    expect_error(edited(files, tmp_path, "retina.pth", to_retinanet), "another architecture: no rpn_head/roi_head keys")


def test_missing_keys_lists_ten_then_counts(files, tmp_path):
    def drop(sd):
        for k in [k for k in sd if k.startswith("backbone.norm")]:  # 4 norms x (weight, bias)
            del sd[k]
        for k in [k for k in sd if k.startswith("neck.fpn_convs.")]:  # 4 convs x (weight, bias)
            del sd[k]
    message = expect_error(edited(files, tmp_path, "missing.pth", drop), "missing keys in state_dict: ")
    assert message.endswith(" and 6 more")
    assert message.count(", ") == 9 and "backbone.norm0.weight" in message


def test_unexpected_keys(files, tmp_path):
    def add(sd):
        sd["roi_head.extra.weight"] = torch.ones(1)
    expect_error(edited(files, tmp_path, "extra.pth", add),
                 "unexpected keys in state_dict: roi_head.extra.weight")


def test_shape_mismatch(files, tmp_path):
    def resize(sd):
        sd["rpn_head.rpn_conv.bias"] = torch.zeros(31)
    expect_error(edited(files, tmp_path, "shape.pth", resize),
                 "shape mismatch in state_dict: rpn_head.rpn_conv.bias (31,) vs model (32,)")


def test_config_that_does_not_match(files):
    expect_error(files["mask", "swin-det"], "does not match config", TINY["cascade"])
    swin_t = ROOT / "configs/swin/mask_rcnn_swin_tiny_patch4_window7_mstrain_480-800_adamw_3x_coco.py"
    message = expect_error(files["mask", "swin-det"], "does not match config", swin_t)
    assert "embed_dim 96 vs 16" in message and "num_classes 80 vs 4" in message


def test_class_names_that_do_not_match(files, tmp_path):
    ckpt = raw(files["mask", "swin-det"])
    ckpt["meta"]["CLASSES"] = ("a", "b")
    expect_error(save_checkpoint(ckpt, tmp_path / "cls.pth"), "meta lists 2 class names but the model has 4")


def test_read_checkpoint_returns_swin_det_layout(files):
    sd, meta, layout = read_checkpoint(files["cascade", "mmdet3"])
    assert layout == "mmdet3" and meta["dataset_meta"]["classes"] == CLASSES
    assert set(sd) == set(build_detector(load_config(TINY["cascade"])).state_dict())


# ----------------------------------------------------------------------------- the tool


def test_make_random_checkpoint_tool(tmp_path):
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import make_random_checkpoint as tool
    finally:
        sys.path.pop(0)
    out = tmp_path / "tool.pth"
    assert tool.main(["--config", str(TINY["mask"]), "--layout", "mmdet3", "--seed", "3", "--out", str(out)]) == 0
    detector, info = load_checkpoint(out)
    assert info.layout == "mmdet3" and info.classes == CLASSES
    again = tmp_path / "again.pth"
    tool.main(["--config", str(TINY["mask"]), "--layout", "mmdet3", "--seed", "3", "--out", str(again)])
    assert all(torch.equal(a, b) for a, b in zip(raw(out)["state_dict"].values(), raw(again)["state_dict"].values()))
    assert tool.main(["--config", str(TINY["mask"]), "--out", str(tmp_path / "no/such/dir.pth")]) == 2
    assert not list(tmp_path.glob(".*.part"))
