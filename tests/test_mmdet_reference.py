"""Cross-check against mmdetection's own Swin (Cascade) Mask R-CNN, where mmdet and mmcv import.

The same random weights, written once in mmdet 3.x layout, are loaded by our loader (which
renames the keys and reorders the patch-merging channels) and by mmdetection itself; features,
proposals, detections and RoI masks must agree. mmdet 3.3's test path differs from mmdet 2.11's
(ours) in two details, which the comparison steps around: it drops zero-size proposals unless
``min_bbox_size`` is negative (so it gets -1 for 2.11's 0), and it does not zero the outputs of
proposals whose y2 is 0 (so both RoI heads are fed the proposals with y2 > 0).

Set up with ``tools/install_mmdet_reference.sh``, then from the repository root:
``.venv-mmdet/bin/python -m pytest tests/test_mmdet_reference.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from repq_export.config_source import load_config
from repq_export.models.arch import ARCHS, Arch
from repq_export.models.mmdet_config import config_from_arch
from repq_export.models.checkpoint import load_checkpoint
from repq_export.models.random_checkpoint import make_random_checkpoint, save_checkpoint

try:
    import mmcv.ops  # noqa: F401  (compiled RoIAlign / nms)
    from mmdet.registry import MODELS
    from mmdet.structures import DetDataSample
    from mmdet.structures.bbox import bbox2roi
    from mmdet.utils import register_all_modules
    from mmengine.config import ConfigDict
    from mmengine.structures import InstanceData
except Exception as exc:  # ImportError, or mmdet's assertion on the mmcv version
    pytest.skip(f"mmdetection reference not available ({type(exc).__name__}: {exc}); "
                "create it with tools/install_mmdet_reference.sh", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[1]
CASES = {
    "mask_tiny": (lambda: load_config(ROOT / "configs/tiny/mask_rcnn_tiny.py"), (192, 256), (180, 250)),
    "cascade_tiny": (lambda: load_config(ROOT / "configs/tiny/cascade_mask_rcnn_tiny.py"), (192, 256), (180, 250)),
    "mask_rcnn_swin_t": (lambda: config_from_arch(ARCHS["mask_rcnn_swin_t"]), (320, 416), (300, 400)),
    "cascade_swin_t": (lambda: config_from_arch(ARCHS["cascade_swin_t"]), (320, 416), (300, 400)),
}
SLOW = {"mask_rcnn_swin_t", "cascade_swin_t"}


def mmdet3_model_cfg(arch: Arch, model: dict) -> dict:
    """mmdet 3.x's config for the detector our (mmdet 2.x style) model config describes."""
    backbone = dict(
        type="SwinTransformer", embed_dims=arch.embed_dim, depths=list(arch.depths),
        num_heads=list(arch.num_heads), window_size=arch.window_size,
        mlp_ratio=int(arch.mlp_ratio),  # mmdet 3 sizes its FFN with mlp_ratio * embed_dims, unrounded
        patch_size=arch.patch_size, qkv_bias=arch.qkv_bias, qk_scale=None, patch_norm=True,
        drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=0.0, out_indices=(0, 1, 2, 3),
        with_cp=False, convert_weights=False)
    roi = model["roi_head"]

    def box_head(head: dict) -> dict:
        head = {k: v for k, v in head.items() if k not in ("loss_cls", "loss_bbox", "norm_cfg")}
        if arch.conv_norm:
            head["norm_cfg"] = dict(type="BN", requires_grad=True)
        return head

    bbox_heads = roi["bbox_head"] if isinstance(roi["bbox_head"], list) else [roi["bbox_head"]]
    mask_head = {k: v for k, v in roi["mask_head"].items() if k != "loss_mask"}
    roi_head = dict(type=roi["type"], bbox_roi_extractor=roi["bbox_roi_extractor"],
                    mask_roi_extractor=roi["mask_roi_extractor"])
    if arch.kind == "cascade":
        roi_head.update(num_stages=arch.num_stages, stage_loss_weights=roi["stage_loss_weights"],
                        bbox_head=[box_head(h) for h in bbox_heads], mask_head=mask_head)
    else:
        roi_head.update(bbox_head=box_head(bbox_heads[0]), mask_head=mask_head)
    rpn = {k: v for k, v in model["rpn_head"].items() if k not in ("loss_cls", "loss_bbox")}
    rpn_test = {k: v for k, v in model["test_cfg"]["rpn"].items()
                if k in ("nms_pre", "max_per_img", "nms")}
    return dict(
        type="CascadeRCNN" if arch.kind == "cascade" else "MaskRCNN",
        backbone=backbone, neck=model["neck"], rpn_head=rpn, roi_head=roi_head, train_cfg=None,
        test_cfg=dict(rpn=dict(rpn_test, min_bbox_size=-1), rcnn=model["test_cfg"]["rcnn"]))


def mmdet_rpn(ref, img: torch.Tensor, img_hw: tuple[int, int]):
    """mmdetection's features and proposals (InstanceData with bboxes, scores), and the image meta."""
    pad_hw = tuple(img.shape[2:])
    meta = dict(img_shape=img_hw, ori_shape=img_hw, pad_shape=pad_hw, batch_input_shape=pad_hw,
                scale_factor=(1.0, 1.0))
    feats = ref.extract_feat(img)
    return feats, ref.rpn_head.predict(feats, [DetDataSample(metainfo=meta)], rescale=False)[0], meta


def mmdet_roi(ref, feats, proposals: torch.Tensor, meta: dict, cascade: bool):
    """mmdetection's detections on the given proposals and their RoI mask probabilities."""
    dets = ref.roi_head.predict_bbox(feats, [meta], [InstanceData(bboxes=proposals)],
                                     ref.roi_head.test_cfg, rescale=False)[0]
    rois = bbox2roi([dets.bboxes])
    if cascade:
        stage_probs = [ref.roi_head._mask_forward(i, feats, rois)["mask_preds"].sigmoid()
                       for i in range(ref.roi_head.num_stages)]
        probs = sum(stage_probs) / len(stage_probs)
    else:
        probs = ref.roi_head._mask_forward(feats, rois)["mask_preds"].sigmoid()
    return dets, probs[torch.arange(len(dets)), dets.labels]


def match(ours: tuple[torch.Tensor, ...], theirs: tuple[torch.Tensor, ...], atol: tuple[float, ...]) -> torch.Tensor:
    """Index into ``theirs`` for each of our rows, pairing rows whose fields all agree within ``atol``.

    Order-free, since two frameworks may order detections of (nearly) tied scores differently.
    Fields are (boxes (n, 4), scores (n,), [labels (n,)]). Fails if any row has no partner.
    """
    close = torch.ones(len(ours[0]), len(theirs[0]), dtype=torch.bool)
    for a, b, tol in zip(ours, theirs, atol):
        a, b = a.double().reshape(len(a), -1), b.double().reshape(len(b), -1)
        close &= torch.cdist(a, b, p=float("inf")) <= tol
    partner, used = [], set()
    for i, row in enumerate(close):
        free = [j for j in row.nonzero().flatten().tolist() if j not in used]
        assert free, f"row {i} ({[t[i].tolist() for t in ours]}) has no counterpart in mmdetection's output"
        partner.append(free[0])
        used.add(free[0])
    return torch.tensor(partner, dtype=torch.long)


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.slow) if c in SLOW else c for c in CASES])
def test_same_detections_as_mmdetection(case, tmp_path):
    make_cfg, pad_hw, img_hw = CASES[case]
    cfg = make_cfg()
    checkpoint = make_random_checkpoint(cfg, layout="mmdet3", seed=11)
    path = save_checkpoint(checkpoint, tmp_path / f"{case}_mmdet3.pth")
    ours, info = load_checkpoint(path)
    assert info.layout == "mmdet3"

    register_all_modules()
    ref = MODELS.build(ConfigDict(mmdet3_model_cfg(info.arch, cfg["model"])))
    ref.load_state_dict(checkpoint["state_dict"], strict=True)
    ref.eval()

    img = torch.randn(1, 3, *pad_hw, generator=torch.Generator().manual_seed(5))
    hw = torch.tensor(img_hw, dtype=torch.float32)
    with torch.no_grad():
        ref_feats, ref_props, meta = mmdet_rpn(ref, img, img_hw)
        feats = ours.extract_feat(img)
        proposals, proposal_scores = ours.rpn_head(feats, hw)
        kept = proposals[proposals[:, 3] > 0]
        ref_dets, ref_masks = mmdet_roi(ref, ref_feats, kept, meta, info.arch.kind == "cascade")
        boxes, scores, labels, masks = ours.roi_head(feats, kept, hw)

    assert len(feats) == len(ref_feats) == 5
    for a, b in zip(feats, ref_feats):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert proposals.shape == ref_props.bboxes.shape and len(kept) > len(proposals) // 2
    match((proposals, proposal_scores), (ref_props.bboxes, ref_props.scores), (1e-3, 1e-5))
    assert 0 < boxes.shape[0] == len(ref_dets)
    partner = match((boxes, scores, labels), (ref_dets.bboxes, ref_dets.scores, ref_dets.labels), (1e-3, 1e-5, 0))
    torch.testing.assert_close(masks, ref_masks[partner], rtol=1e-4, atol=1e-4)
