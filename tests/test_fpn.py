"""ConvModule and FPN (mmdet 2.11 layout and semantics), and the backbone + FPN ONNX export at
dynamic input sizes."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from repq_export.models.fpn import FPN
from repq_export.models.layers import ConvModule, MatMul
from repq_export.models.swin import SwinBlock, SwinTransformer


def test_conv_module_keys_and_conv_bn_relu_forward():
    torch.manual_seed(0)
    m = ConvModule(4, 8, 3, padding=1, bias=False, norm=True, act=True).eval()
    bn_keys = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    assert list(m.state_dict()) == ["conv.weight"] + [f"bn.{k}" for k in bn_keys]
    with torch.no_grad():
        m.bn.running_mean.uniform_(-1, 1)
        m.bn.running_var.uniform_(0.5, 2)
        m.bn.weight.uniform_(0.5, 2)
        m.bn.bias.uniform_(-1, 1)
        x = torch.randn(1, 4, 6, 5)
        y = nn.functional.conv2d(x, m.conv.weight, padding=1)
        scale = m.bn.weight / torch.sqrt(m.bn.running_var + 1e-5)
        mean, bias = m.bn.running_mean[:, None, None], m.bn.bias[:, None, None]
        expected = torch.relu((y - mean) * scale[:, None, None] + bias)
        got = m(x)
    assert got.shape == (1, 8, 6, 5) and (got == 0).any()
    assert torch.allclose(got, expected, atol=1e-5)

    plain = ConvModule(4, 8, 1)
    assert list(plain.state_dict()) == ["conv.weight", "conv.bias"]
    assert (plain(x) < 0).any()  # no activation unless asked


def test_matmul_module():
    a, b = torch.randn(2, 3, 4), torch.randn(2, 4, 5)
    assert torch.equal(MatMul()(a, b), a @ b)


def test_fpn_keys_follow_mmdet_layout():
    sd = FPN([8, 16, 32, 64], 16).state_dict()
    expected = [f"lateral_convs.{i}.conv.{k}" for i in range(4) for k in ("weight", "bias")]
    expected += [f"fpn_convs.{i}.conv.{k}" for i in range(4) for k in ("weight", "bias")]
    assert list(sd) == expected
    assert sd["lateral_convs.3.conv.weight"].shape == (16, 64, 1, 1)
    assert sd["fpn_convs.0.conv.weight"].shape == (16, 16, 3, 3)


def test_fpn_top_down_nearest_and_max_pool_by_hand():
    fpn = FPN([1, 1, 1], 1, num_outs=4)
    with torch.no_grad():
        for conv in fpn.lateral_convs:
            conv.conv.weight.fill_(2.0)
            conv.conv.bias.zero_()
        for conv in fpn.fpn_convs:
            conv.conv.weight.zero_()
            conv.conv.weight[0, 0, 1, 1] = 1.0
            conv.conv.bias.fill_(0.5)
        c2 = torch.full((5, 7), 100.0)
        c3 = torch.arange(12.0).reshape(3, 4)
        c4 = torch.tensor([[1000.0, 2000], [3000, 4000]])
        outs = fpn([c[None, None] for c in (c2, c3, c4)])
    # nearest with size: source index floor(dst * in / out)
    up_3x4_from_2x2 = (torch.tensor([0, 0, 1]), torch.tensor([0, 0, 1, 1]))
    up_5x7_from_3x4 = (torch.tensor([0, 0, 1, 1, 2]), torch.tensor([0, 0, 1, 1, 2, 2, 3]))
    lat4 = 2 * c4
    lat3 = 2 * c3 + lat4[up_3x4_from_2x2[0]][:, up_3x4_from_2x2[1]]
    lat2 = 2 * c2 + lat3[up_5x7_from_3x4[0]][:, up_5x7_from_3x4[1]]
    # last row: 2 * 100 + lat3 row 2 at columns 0 0 1 1 2 2 3,
    # lat3 row 2 = 2 * (8, 9, 10, 11) + 2 * (3000, 3000, 4000, 4000)
    assert lat2[4].tolist() == [6216.0, 6216, 6218, 6218, 8220, 8220, 8222]
    assert [tuple(o.shape[2:]) for o in outs] == [(5, 7), (3, 4), (2, 2), (1, 1)]
    for out, lat in zip(outs, (lat2, lat3, lat4)):
        assert torch.equal(out[0, 0], lat + 0.5)
    assert outs[3].item() == 2000.5  # P6 = P5 output (not lateral) subsampled by max-pool k1 s2


def test_fpn_extra_level_shapes_on_odd_sizes():
    fpn = FPN([8, 16, 32, 64], 16, num_outs=5)
    sizes = [(25, 38), (13, 19), (7, 10), (4, 5)]
    feats = [torch.randn(1, c, *hw) for c, hw in zip((8, 16, 32, 64), sizes)]
    outs = fpn(feats)
    assert [tuple(o.shape) for o in outs] == [(1, 16, *hw) for hw in sizes + [(2, 3)]]
    assert torch.equal(outs[4], outs[3][:, :, ::2, ::2])


def test_fpn_refuses_bad_arguments():
    with pytest.raises(ValueError):
        FPN([8, 16, 32, 64], 16, num_outs=3)
    with pytest.raises(ValueError):
        FPN([8, 16], 16)([torch.randn(1, 8, 4, 4)])


class BackboneNeck(nn.Module):
    """Tiny Swin + FPN, as the detector wires them."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = SwinTransformer(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4))
        self.neck = FPN([16, 32, 64, 128], 32, num_outs=5)

    def forward(self, img: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.neck(self.backbone(img))


def test_backbone_fpn_onnx_export_follows_input_size(tmp_path):
    torch.manual_seed(0)
    model = BackboneNeck().eval()
    for m in model.modules():  # exercise the reparameterization padding path too
        if isinstance(m, SwinBlock):
            m.pad_value = torch.randn(m.dim)
    path = str(tmp_path / "backbone_fpn.onnx")
    torch.onnx.export(
        model, (torch.randn(1, 3, 64, 96),), path, dynamo=False, opset_version=17,
        input_names=["img"], dynamic_axes={"img": {2: "h", 3: "w"}},
    )
    ops = [n.op_type for n in onnx.load(path).graph.node]
    num_layernorms = sum(isinstance(m, nn.LayerNorm) for m in model.modules())
    assert ops.count("LayerNormalization") == num_layernorms == 24

    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    # 96x160: maps 24x40, 12x20, 6x10, 3x5 (no multiple of 7); 112x224: 28x56 .. 4x7; 70x101: odd maps
    for hw in [(96, 160), (112, 224), (70, 101)]:
        img = torch.randn(1, 3, *hw)
        with torch.no_grad():
            ref = model(img)
        got = session.run(None, {"img": img.numpy()})
        assert [g.shape for g in got] == [tuple(r.shape) for r in ref]
        assert max(float(np.abs(g - r.numpy()).max()) for g, r in zip(got, ref)) < 1e-4
        assert min(float(r.std()) for r in ref) > 0.05
