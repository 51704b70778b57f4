"""RPN proposals, R-CNN / cascade test semantics (hand cases), checkpoint key names, and the
ONNX export of a whole tiny detector (legacy exporter, dynamic H/W) against torch."""

import io
import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from repq_export.boundary import INPUT_NAMES, MASK_SIZE, OUTPUT_NAMES
from repq_export.models.anchors import AnchorGenerator
from repq_export.models.bbox_head import ConvFCBBoxHead, Shared2FCBBoxHead, multiclass_nms
from repq_export.models.detector import Detector
from repq_export.models.fpn import FPN
from repq_export.models.mask_head import FCNMaskHead
from repq_export.models.roi_heads import CascadeRoIHead, StandardRoIHead
from repq_export.models.rpn_head import RPNHead
from repq_export.models.swin import SwinTransformer

sigmoid = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731


# ----------------------------------------------------------------------------- RPN
def test_rpn_proposals_topk_clip_and_nms_per_level():
    gen = AnchorGenerator(strides=[4, 8], ratios=[1.0], scales=[1], base_sizes=[8, 8])
    rpn = RPNHead(4, 4, gen, nms_pre=3, nms_iou=0.4)
    cls_maps = [torch.tensor([[[[3.0, 2.0], [-1.0, -2.0]]]]), torch.tensor([[[[1.0]]]])]
    reg_maps = [torch.zeros(1, 4, 2, 2), torch.zeros(1, 4, 1, 1)]
    boxes, scores = rpn.proposals(cls_maps, reg_maps, torch.tensor([8.0, 8.0]))
    # level 0 keeps its top 3 (clipped anchors [0,0,4,4], [0,0,8,4], [0,0,4,8]); the last two
    # overlap the first with IoU 0.5 > 0.4. The identical level-1 box survives (other level).
    torch.testing.assert_close(boxes, torch.tensor([[0.0, 0.0, 4.0, 4.0], [0.0, 0.0, 4.0, 4.0]]))
    torch.testing.assert_close(scores, torch.tensor([sigmoid(3.0), sigmoid(1.0)]))


def test_rpn_decodes_with_deltas_and_caps_proposals():
    gen = AnchorGenerator(strides=[4], ratios=[1.0], scales=[1], base_sizes=[8])
    rpn = RPNHead(4, 4, gen, nms_iou=0.99, max_proposals=1)
    cls_maps = [torch.tensor([[[[0.0, 5.0]]]])]
    reg = torch.zeros(1, 4, 1, 2)
    reg[0, :, 0, 1] = torch.tensor([0.25, 0.0, math.log(0.5), 0.0])  # anchor [0,-4,8,4]
    boxes, scores = rpn.proposals(cls_maps, [reg], torch.tensor([100.0, 100.0]))
    torch.testing.assert_close(boxes, torch.tensor([[4.0, 0.0, 8.0, 4.0]]))
    assert scores.shape == (1,)


# ----------------------------------------------------------------------------- R-CNN
def _constant_bbox_head(num_classes, logits, deltas, agnostic=False):
    """A real Shared2FC head whose outputs are its biases (all weights zero)."""
    head = Shared2FCBBoxHead(
        in_channels=2, fc_out_channels=4, num_classes=num_classes, reg_class_agnostic=agnostic
    )
    with torch.no_grad():
        for p in head.parameters():
            p.zero_()
        head.fc_cls.bias.copy_(torch.tensor(logits))
        head.fc_reg.bias.copy_(torch.tensor(deltas))
    return head


def _constant_mask_head(num_classes, logits):
    head = FCNMaskHead(in_channels=2, conv_out_channels=2, num_convs=1, num_classes=num_classes)
    with torch.no_grad():
        for p in head.parameters():
            p.zero_()
        head.conv_logits.bias.copy_(torch.tensor(logits))
    return head


FEATS = [torch.randn(1, 2, 64 // s, 64 // s) for s in (4, 8, 16, 32)]
ROI = torch.tensor([[10.0, 10.0, 30.0, 50.0]])


def test_cascade_refines_by_argmax_class_and_averages_stage_logits_and_masks():
    heads = [
        _constant_bbox_head(2, [0.0, 3.0, 0.0], [0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0]),  # class 1: dx 0.1
        _constant_bbox_head(2, [5.0, 0.0, 0.0], [0.0, 2.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]),  # class 0: dy 0.1
        _constant_bbox_head(2, [1.0, 0.0, 3.0], [0.0] * 8),
    ]
    masks = [_constant_mask_head(2, b) for b in ([0.0, 1.0], [2.0, -1.0], [-2.0, 3.0])]
    roi_head = CascadeRoIHead(heads, masks)
    boxes, scores, labels, probs = roi_head(FEATS, ROI, torch.tensor([64.0, 64.0]))
    # stage 0 (std 0.1): x + 0.1 * 20; stage 1 (std 0.05): y + 0.1 * 40; stage 2: unchanged
    torch.testing.assert_close(boxes, torch.tensor([[12.0, 14.0, 32.0, 54.0]] * 2))
    # mean logits (2, 1, 1) -> softmax
    denom = math.exp(2) + 2 * math.e
    torch.testing.assert_close(scores, torch.tensor([math.exp(2) / denom, math.e / denom]))
    assert labels.tolist() == [0, 1]
    mean0 = (sigmoid(0.0) + sigmoid(2.0) + sigmoid(-2.0)) / 3
    mean1 = (sigmoid(1.0) + sigmoid(-1.0) + sigmoid(3.0)) / 3
    assert probs.shape == (2, 28, 28)
    torch.testing.assert_close(probs[:, 5, 7], torch.tensor([mean0, mean1]))


def test_cascade_class_agnostic_regression():
    heads = [_constant_bbox_head(2, [0.0, 3.0, 0.0], [1.0, 0.0, 0.0, 0.0], agnostic=True)] + [
        _constant_bbox_head(2, [0.0, 3.0, 0.0], [0.0] * 4, agnostic=True) for _ in range(2)
    ]
    roi_head = CascadeRoIHead(heads, [_constant_mask_head(2, [0.0, 0.0]) for _ in range(3)])
    boxes, _, labels, _ = roi_head(FEATS, ROI, torch.tensor([64.0, 64.0]))
    torch.testing.assert_close(boxes[:1], torch.tensor([[12.0, 10.0, 32.0, 50.0]]))
    assert labels[0].item() == 1


def test_standard_head_scores_nms_and_top_border_rois():
    # proposal 2 has y2 == 0: mmdet 2.11 zeroes its logits (uniform 1/3 scores) and its deltas
    head = _constant_bbox_head(2, [2.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 5.0, 0.0, 0.0, 0.0])
    roi_head = StandardRoIHead(head, _constant_mask_head(2, [0.0, 4.0]))
    proposals = torch.tensor([[10.0, 10.0, 30.0, 50.0], [11.0, 10.0, 31.0, 50.0], [5.0, 0.0, 20.0, 0.0]])
    boxes, scores, labels, probs = roi_head(FEATS, proposals, torch.tensor([64.0, 60.0]))
    p0 = math.exp(2) / (math.exp(2) + 2)
    p1 = 1 / (math.exp(2) + 2)
    # class 0: the two near-identical boxes overlap (IoU 0.9) -> one; class 1: shifted by 5 * 0.1 * 20
    # and clipped to w = 60 -> two boxes that overlap -> one; the y2 == 0 RoI scores 1/3 in both classes
    assert labels.tolist() == [0, 0, 1, 1]
    torch.testing.assert_close(scores, torch.tensor([p0, 1 / 3, 1 / 3, p1]))
    torch.testing.assert_close(boxes[0], proposals[0])
    torch.testing.assert_close(boxes[1], proposals[2])
    torch.testing.assert_close(boxes[3], torch.tensor([20.0, 10.0, 40.0, 50.0]))
    torch.testing.assert_close(probs[:, 0, 0], torch.tensor([0.5, 0.5, sigmoid(4.0), sigmoid(4.0)]))


def test_multiclass_nms_threshold_is_strict_and_caps_count():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0], [40.0, 0.0, 50.0, 10.0]])
    scores = torch.tensor([[0.05, 0.9, 0.05], [0.3, 0.2, 0.5], [0.6, 0.06, 0.34]])
    b, s, lab = multiclass_nms(boxes, scores, 0.05, 0.5, max_num=3, class_agnostic=True)
    assert s.tolist() == pytest.approx([0.9, 0.6, 0.3])
    assert lab.tolist() == [1, 0, 0]
    torch.testing.assert_close(b[1], boxes[2])
    empty = multiclass_nms(boxes, torch.full((3, 3), 0.01), 0.05, 0.5, 100, True)
    assert [t.shape[0] for t in empty] == [0, 0, 0]


# ----------------------------------------------------------------------------- keys
def _tiny_detector(cascade: bool, num_classes: int = 20) -> Detector:
    """Tiny Swin + FPN detector whose random weights give detections (three confident classes)."""
    torch.manual_seed(0)
    backbone = SwinTransformer(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1), window_size=7)
    neck = FPN([16, 32, 64, 128], 16, 5)
    rpn = RPNHead(16, 16, AnchorGenerator())
    if cascade:
        bbox_heads = [
            ConvFCBBoxHead(16, num_shared_convs=4, num_shared_fcs=1, conv_out_channels=16, fc_out_channels=32,
                           num_classes=num_classes, conv_norm=True)
            for _ in range(3)
        ]
        mask_heads = [FCNMaskHead(16, 16, 4, num_classes) for _ in range(3)]
        roi_head = CascadeRoIHead(bbox_heads, mask_heads)
    else:
        bbox_heads = [Shared2FCBBoxHead(16, 32, num_classes=num_classes)]
        roi_head = StandardRoIHead(bbox_heads[0], FCNMaskHead(16, 16, 4, num_classes))
    with torch.no_grad():
        for head in bbox_heads:
            head.fc_cls.bias[:3] += 6.0
            for m in head.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.running_mean.uniform_(-0.1, 0.1)
                    m.running_var.uniform_(0.5, 1.5)
                    m.weight.uniform_(0.5, 1.5)
    return Detector(backbone, neck, rpn, roi_head).eval()


def test_head_state_dict_keys_follow_swin_det_checkpoints():
    keys = set(_tiny_detector(False).state_dict())
    for k in ["rpn_head.rpn_conv.weight", "rpn_head.rpn_cls.bias", "rpn_head.rpn_reg.weight",
              "roi_head.bbox_head.shared_fcs.1.weight", "roi_head.bbox_head.fc_cls.weight",
              "roi_head.mask_head.convs.3.conv.bias", "roi_head.mask_head.upsample.weight",
              "roi_head.mask_head.conv_logits.bias"]:
        assert k in keys
    sd = _tiny_detector(False).state_dict()
    assert sd["rpn_head.rpn_cls.weight"].shape[0] == 3 and sd["rpn_head.rpn_reg.weight"].shape[0] == 12
    assert sd["roi_head.bbox_head.fc_cls.weight"].shape[0] == 21
    assert sd["roi_head.bbox_head.fc_reg.weight"].shape[0] == 80
    assert sd["roi_head.mask_head.conv_logits.weight"].shape[0] == 20
    assert not any("extractor" in k or "anchor" in k for k in keys)
    ckeys = set(_tiny_detector(True).state_dict())
    head_keys = {k for k in ckeys if k.startswith("roi_head.")}
    per_stage = {"shared_convs.%d.conv.weight" % i for i in range(4)} | {
        "shared_convs.%d.bn.%s" % (i, n) for i in range(4)
        for n in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    } | {f"{m}.{n}" for m in ("shared_fcs.0", "fc_cls", "fc_reg") for n in ("weight", "bias")}
    mask = {"convs.%d.conv.%s" % (i, n) for i in range(4) for n in ("weight", "bias")} | {
        "upsample.weight", "upsample.bias", "conv_logits.weight", "conv_logits.bias"}
    expected = {f"roi_head.bbox_head.{s}.{k}" for s in range(3) for k in per_stage} | {
        f"roi_head.mask_head.{s}.{k}" for s in range(3) for k in mask}
    assert head_keys == expected


# ----------------------------------------------------------------------------- export
def _export(model: Detector) -> bytes:
    f = io.BytesIO()
    img = torch.randn(1, 3, 128, 160)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (img, torch.tensor([128.0, 150.0])), f, dynamo=False, opset_version=17,
                          input_names=list(INPUT_NAMES), output_names=list(OUTPUT_NAMES),
                          dynamic_axes={"img": {2: "h", 3: "w"}})
    return f.getvalue()


def _match(ref: list, got: list) -> np.ndarray:
    """Index into ``got`` of each ``ref`` detection (equal-score detections may come in any order)."""
    key_ref = np.concatenate([ref[0], ref[1][:, None] * 100, ref[2][:, None] * 1000.0], 1)
    key_got = np.concatenate([got[0], got[1][:, None] * 100, got[2][:, None] * 1000.0], 1)
    dist = np.abs(key_ref[:, None, :] - key_got[None, :, :]).max(-1)
    order = dist.argmin(1) if len(ref[0]) else np.zeros(0, np.int64)
    assert len(set(order.tolist())) == len(order)
    return order


def _compare(model: Detector, onnx_bytes: bytes, img: torch.Tensor, img_hw: torch.Tensor) -> int:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(onnx_bytes, opts, providers=["CPUExecutionProvider"])
    got = sess.run(None, {"img": img.numpy(), "img_hw": img_hw.numpy()})
    with torch.no_grad():
        ref = [t.numpy() for t in model(img, img_hw)]
    n = ref[0].shape[0]
    assert [g.shape for g in got] == [(n, 4), (n,), (n,), (n, MASK_SIZE, MASK_SIZE)] == [r.shape for r in ref]
    assert got[2].dtype == np.int64 and ref[2].dtype == np.int64
    got = [g[_match(ref, got)] for g in got]
    np.testing.assert_array_equal(got[2], ref[2])
    np.testing.assert_allclose(got[0], ref[0], rtol=0, atol=2e-3)
    np.testing.assert_allclose(got[1], ref[1], rtol=0, atol=1e-5)
    np.testing.assert_allclose(got[3], ref[3], rtol=0, atol=1e-4)
    h, w = img_hw.tolist()
    assert (ref[0] >= 0).all() and (ref[0][:, 0::2] <= w).all() and (ref[0][:, 1::2] <= h).all()
    return n


def _suppress_all_classes(model: Detector, onnx_bytes: bytes) -> bytes:
    """Make every foreground logit hopeless, in the torch model and in the exported graph alike."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load_from_string(onnx_bytes)
    inits = {t.name: t for t in graph.graph.initializer}
    for name, param in model.named_parameters():
        if name.endswith("fc_cls.bias"):
            with torch.no_grad():
                param[:-1] -= 60.0
            inits[name].CopyFrom(numpy_helper.from_array(param.detach().numpy(), name))
    return graph.SerializeToString()


@pytest.mark.parametrize("cascade", [False, True], ids=["mask_rcnn", "cascade"])
def test_detector_onnx_export_dynamic_size_and_empty_case_match_torch(cascade):
    model = _tiny_detector(cascade)
    onnx_bytes = _export(model)  # traced at 128x160
    torch.manual_seed(1)
    n = _compare(model, onnx_bytes, torch.randn(1, 3, 160, 224), torch.tensor([150.0, 210.0]))
    assert 0 < n <= 100
    # the same graph must also return N = 0 tensors of the right shapes and dtypes
    empty = _suppress_all_classes(model, onnx_bytes)
    assert _compare(model, empty, torch.randn(1, 3, 96, 128), torch.tensor([90.0, 128.0])) == 0
