"""Swin backbone: Swin-Det key layout, hand-checked index and shift mask, shapes, pad_value hook,
and agreement with torchvision's independent Swin implementation."""

import pytest
import torch
import torchvision.models.swin_transformer as tv_swin

from repq_export.models.layers import MatMul
from repq_export.models.swin import (
    PatchMerging,
    SwinBlock,
    SwinTransformer,
    WindowAttention,
    relative_position_index,
    shifted_window_mask,
)

BLOCK_KEYS = [
    "norm1.weight",
    "norm1.bias",
    "attn.relative_position_bias_table",
    "attn.relative_position_index",
    "attn.qkv.weight",
    "attn.qkv.bias",
    "attn.proj.weight",
    "attn.proj.bias",
    "norm2.weight",
    "norm2.bias",
    "mlp.fc1.weight",
    "mlp.fc1.bias",
    "mlp.fc2.weight",
    "mlp.fc2.bias",
]


def tiny(**kw) -> SwinTransformer:
    torch.manual_seed(0)
    args = dict(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4), window_size=7)
    args.update(kw)
    return SwinTransformer(**args).eval()


def test_state_dict_keys_follow_swin_det_layout():
    model = tiny(depths=(2, 1), num_heads=(2, 4), out_indices=(0, 1))
    expected = [f"patch_embed.{m}.{k}" for m in ("proj", "norm") for k in ("weight", "bias")]
    expected += [f"layers.0.blocks.{j}.{k}" for j in (0, 1) for k in BLOCK_KEYS]
    expected += [f"layers.0.downsample.{k}" for k in ("reduction.weight", "norm.weight", "norm.bias")]
    expected += [f"layers.1.blocks.0.{k}" for k in BLOCK_KEYS]
    expected += ["norm0.weight", "norm0.bias", "norm1.weight", "norm1.bias"]
    sd = model.state_dict()
    assert list(sd) == expected
    assert sd["layers.0.blocks.1.attn.relative_position_bias_table"].shape == (13 * 13, 2)
    assert sd["layers.0.blocks.1.attn.relative_position_index"].shape == (49, 49)
    assert sd["layers.0.blocks.1.attn.qkv.weight"].shape == (48, 16)
    assert sd["layers.0.downsample.reduction.weight"].shape == (32, 64)
    assert sd["layers.1.blocks.0.mlp.fc1.weight"].shape == (128, 32)
    assert sd["patch_embed.proj.weight"].shape == (16, 3, 4, 4)
    fresh = SwinTransformer(embed_dim=16, depths=(2, 1), num_heads=(2, 4), out_indices=(0, 1))
    fresh.load_state_dict(sd, strict=True)


def test_out_indices_select_output_norms_and_maps():
    model = tiny(out_indices=(1, 3))
    assert not hasattr(model, "norm0") and hasattr(model, "norm3")
    outs = model(torch.randn(1, 3, 64, 64))
    assert [o.shape for o in outs] == [(1, 32, 8, 8), (1, 128, 2, 2)]


def test_relative_position_index_window2_by_hand():
    # tokens (0,0) (0,1) (1,0) (1,1); entry = (dh + 1) * 3 + (dw + 1), (dh, dw) = pos_i - pos_j
    expected = torch.tensor([[4, 3, 1, 0], [5, 4, 2, 1], [7, 6, 4, 3], [8, 7, 5, 4]])
    assert torch.equal(relative_position_index(2), expected)
    attn = WindowAttention(dim=4, window_size=2, num_heads=2)
    assert attn.relative_position_index.dtype == torch.int64
    assert "relative_position_index" in attn.state_dict()
    bias = attn.relative_position_bias()
    table = attn.relative_position_bias_table
    assert torch.equal(bias[1, 0, 3], table[0, 1]) and torch.equal(bias[0, 3, 0], table[8, 0])


def test_shift_mask_window2_map4x4_by_hand():
    # Rolled 4x4 map, window 2, shift 1: row/col regions are [0, 0, 1, 2]; label = 3 * row + col region.
    # Window 0 (rows 0-1, cols 0-1): all region 0.           Window 1 (rows 0-1, cols 2-3): labels 1 2 1 2.
    # Window 2 (rows 2-3, cols 0-1): labels 3 3 6 6.         Window 3 (rows 2-3, cols 2-3): labels 4 5 7 8.
    masked = torch.tensor(
        [
            [[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]],
            [[0, 1, 0, 1], [1, 0, 1, 0], [0, 1, 0, 1], [1, 0, 1, 0]],
            [[0, 0, 1, 1], [0, 0, 1, 1], [1, 1, 0, 0], [1, 1, 0, 0]],
            [[0, 1, 1, 1], [1, 0, 1, 1], [1, 1, 0, 1], [1, 1, 1, 0]],
        ],
        dtype=torch.bool,
    )
    mask = shifted_window_mask(4, 4, 2, 1, torch.float32, torch.device("cpu"))
    assert torch.equal(mask, torch.where(masked, -100.0, 0.0))


@pytest.mark.parametrize("hw", [(7, 7), (14, 21), (21, 14)])
def test_shift_mask_matches_slice_labelling(hw):
    Hp, Wp, w, s = *hw, 7, 3
    labels = torch.zeros(Hp, Wp)
    bands = (slice(0, -w), slice(-w, -s), slice(-s, None))
    for i, rows in enumerate(bands):
        for j, cols in enumerate(bands):
            labels[rows, cols] = 3 * i + j
    win = labels.reshape(Hp // w, w, Wp // w, w).permute(0, 2, 1, 3).reshape(-1, w * w)
    expected = torch.where(win[:, None, :] != win[:, :, None], -100.0, 0.0)
    assert torch.equal(shifted_window_mask(Hp, Wp, w, s, torch.float32, torch.device("cpu")), expected)


@pytest.mark.parametrize(
    "hw, sizes",
    [((64, 96), [(16, 24), (8, 12), (4, 6), (2, 3)]), ((70, 101), [(18, 26), (9, 13), (5, 7), (3, 4)])],
)
def test_output_shapes_follow_ceil_strides(hw, sizes):
    with torch.no_grad():
        outs = tiny()(torch.randn(1, 3, *hw))
    assert [tuple(o.shape) for o in outs] == [(1, c, h, w) for c, (h, w) in zip((16, 32, 64, 128), sizes)]


def _tv_to_ours(tv_sd: dict, depths: tuple) -> dict:
    """torchvision Swin state dict -> our key names (stages at features 1, 3, ...; merges at 2, 4, ...)."""
    out = {}
    for key, value in tv_sd.items():
        parts = key.split(".")
        if parts[0] != "features":
            continue
        idx = int(parts[1])
        if idx == 0:
            out[{"0": "patch_embed.proj", "2": "patch_embed.norm"}[parts[2]] + "." + parts[3]] = value
        elif idx % 2 == 1:
            rest = ".".join(parts[3:]).replace("mlp.0.", "mlp.fc1.").replace("mlp.3.", "mlp.fc2.")
            if rest.endswith("relative_position_index"):
                n = int(value.numel() ** 0.5)
                value = value.reshape(n, n)
            out[f"layers.{idx // 2}.blocks.{parts[2]}.{rest}"] = value
        else:
            out[f"layers.{idx // 2 - 1}.downsample.{'.'.join(parts[2:])}"] = value
    return out


def test_matches_torchvision_swin_when_maps_exceed_window():
    # torchvision drops the shift where a padded map is no larger than the window; Swin-Det does not,
    # so compare on maps larger than 7 (25x41 and 13x21: odd, and not multiples of 7 but one).
    depths, heads = (2, 2), (2, 4)
    torch.manual_seed(1)
    tv = tv_swin.SwinTransformer([4, 4], 16, list(depths), list(heads), [7, 7]).eval()
    with torch.no_grad():  # move away from the near-uniform attention of the default init
        for name, p in tv.named_parameters():
            if "relative_position_bias_table" in name or "norm" in name or name.startswith("features.0.2"):
                p.add_(torch.randn_like(p) * 0.5)
            elif "qkv.weight" in name:
                p.mul_(10.0)
    ours = SwinTransformer(embed_dim=16, depths=depths, num_heads=heads, out_indices=(0, 1)).eval()
    mapped = _tv_to_ours(tv.state_dict(), depths)
    mapped["norm0.weight"], mapped["norm0.bias"] = torch.ones(16), torch.zeros(16)
    mapped["norm1.weight"], mapped["norm1.bias"] = tv.norm.weight.detach(), tv.norm.bias.detach()
    ours.load_state_dict(mapped, strict=True)

    x = torch.randn(1, 3, 100, 164)
    with torch.no_grad():
        f0 = tv.features[1](tv.features[0](x))
        stage1 = tv.norm(tv.features[3](tv.features[2](f0)))
        out0, out1 = ours(x)
    ref0 = torch.nn.functional.layer_norm(f0, (16,)).permute(0, 3, 1, 2)
    assert out0.shape == (1, 16, 25, 41) and out1.shape == (1, 32, 13, 21)
    assert (out0 - ref0).abs().max() < 1e-5
    assert (out1 - stage1.permute(0, 3, 1, 2)).abs().max() < 1e-5
    assert out1.std() > 0.5


def test_matmul_hooks_see_scaled_q_and_softmax():
    seen = {}

    def record(name):
        def hook(module, args):
            seen[name] = args
        return hook

    model = tiny(depths=(2,), num_heads=(2,), out_indices=(0,))
    attn = model.layers[0].blocks[1].attn
    assert isinstance(attn.matmul1, MatMul) and isinstance(attn.matmul2, MatMul)
    attn.matmul1.register_forward_pre_hook(record("mm1"))
    attn.matmul2.register_forward_pre_hook(record("mm2"))
    with torch.no_grad():
        model(torch.randn(1, 3, 40, 36))  # 10x9 tokens -> 14x14 padded -> 4 windows of 49
    a, b = seen["mm1"]
    assert a.shape == (4, 2, 49, 8) and b.shape == (4, 2, 8, 49)
    p, v = seen["mm2"]
    assert torch.allclose(p.sum(-1), torch.ones(4, 2, 49), atol=1e-6)
    # window 3 = rolled rows/cols 7..13; regions along each axis: 7..10 -> 1, 11..13 -> 2 (wrapped)
    assert p[3, :, 0, 1:4].min() > 1e-6  # same region as token 0
    assert p[3, :, 0, 4:7].max() < 1e-30 and p[3, :, 0, 28:].max() < 1e-30  # other regions: masked


def _set_pad_value(model: SwinTransformer, value) -> None:
    for m in model.modules():
        if isinstance(m, SwinBlock):
            m.pad_value = None if value is None else value(m.dim)


def test_batch_of_two_equals_two_single_images():
    model = tiny()
    x = torch.randn(2, 3, 72, 100)
    with torch.no_grad():
        both, first, second = model(x), model(x[:1]), model(x[1:])
    for b, f, s in zip(both, first, second):
        assert torch.allclose(b, torch.cat([f, s]), atol=1e-5)


def test_zero_pad_value_is_bitwise_identical_to_none():
    model = tiny()
    x = torch.randn(1, 3, 72, 100)  # 18x25 tokens: every stage padded
    with torch.no_grad():
        ref = model(x)
        _set_pad_value(model, torch.zeros)
        got = model(x)
    assert all(torch.equal(a, b) for a, b in zip(ref, got))


def test_pad_value_matters_only_where_maps_are_padded():
    model = tiny(window_size=2)
    block = model.layers[0].blocks[0]
    assert "layers.0.blocks.0.pad_value" not in model.state_dict()
    x_even, x_odd = torch.randn(1, 3, 64, 64), torch.randn(1, 3, 64, 68)  # 16x16 vs 16x17 tokens
    with torch.no_grad():
        ref_even, ref_odd = model(x_even), model(x_odd)
        block.pad_value = torch.full((16,), 3.0)
        got_even, got_odd = model(x_even), model(x_odd)
    assert "layers.0.blocks.0.pad_value" in model.state_dict()
    assert all(torch.equal(a, b) for a, b in zip(ref_even, got_even))
    assert (got_odd[0] - ref_odd[0]).abs().max() > 1e-3


def test_padded_tokens_hold_pad_value_exactly():
    block = SwinBlock(dim=4, num_heads=1, window_size=3)
    block.pad_value = torch.tensor([0.1, -2.0, 3.3, 7.0])
    x = torch.randn(1, 4, 5, 4)
    padded = block.pad_to_windows(x)
    assert padded.shape == (1, 6, 6, 4)
    assert torch.equal(padded[:, :4, :5], x)
    assert torch.equal(padded[0, 5, 0], block.pad_value) and torch.equal(padded[0, 2, 5], block.pad_value)


def test_patch_merging_order_and_odd_zero_padding_by_hand():
    down = PatchMerging(dim=1)
    down.norm, down.reduction = torch.nn.Identity(), torch.nn.Identity()
    x = torch.tensor([[1.0, 2, 3], [11, 12, 13], [21, 22, 23]])  # 3x3 map, value = 10 * row + col + 1
    out = down(x.reshape(1, 9, 1), 3, 3)
    # each token: [x(2i, 2j), x(2i+1, 2j), x(2i, 2j+1), x(2i+1, 2j+1)], zeros beyond the map
    expected = torch.tensor([[1.0, 11, 2, 12], [3, 13, 0, 0], [21, 0, 22, 0], [23, 0, 0, 0]])
    assert torch.equal(out, expected[None])


def test_patch_embed_pads_right_and_bottom_with_zeros():
    embed = tiny().patch_embed
    x = torch.randn(1, 3, 70, 101)
    with torch.no_grad():
        tokens, H, W = embed(x)
        ref, _, _ = embed(torch.nn.functional.pad(x, (0, 3, 0, 2)))
    assert (H, W) == (18, 26) and torch.equal(tokens, ref)


def test_reduction_with_bias_still_works():
    down = tiny().layers[0].downsample
    lin = torch.nn.Linear(64, 32, bias=True)
    x = torch.randn(1, 15, 16)  # 3x5 tokens -> 2x3 after odd-size padding
    with torch.no_grad():
        lin.weight.copy_(down.reduction.weight)
        lin.bias.fill_(0.5)
        before = down(x, 3, 5)
        down.reduction = lin
        after = down(x, 3, 5)
    assert before.shape == (1, 6, 32)
    assert torch.allclose(after, before + 0.5, atol=1e-6)


@pytest.mark.parametrize(
    "kw",
    [
        dict(depths=(2, 2), num_heads=(1,)),
        dict(embed_dim=10, num_heads=(3, 6, 12, 24)),
        dict(out_indices=(4,)),
    ],
)
def test_inconsistent_architecture_is_refused(kw):
    with pytest.raises(ValueError):
        tiny(**kw)


@pytest.mark.slow
def test_swin_t_full_size_shapes():
    model = SwinTransformer().eval()
    with torch.no_grad():
        outs = model(torch.randn(1, 3, 800, 1216))
    assert [tuple(o.shape) for o in outs] == [
        (1, 96, 200, 304), (1, 192, 100, 152), (1, 384, 50, 76), (1, 768, 25, 38)
    ]
    assert all(torch.isfinite(o).all() for o in outs)
