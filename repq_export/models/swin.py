"""Swin Transformer backbone with the inference semantics of Swin-Transformer-Object-Detection.

Module names equal that repository's (mmdet 2.11) state-dict keys. Tokens travel as (B, H*W, C)
with H and W passed alongside: plain ints in eager mode, traced sizes under ``torch.onnx`` tracing,
so every padding and the shift mask are derived from the input's shape, never from constants.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import MatMul

MASK_VALUE = -100.0  # added to the logits of token pairs that the shifted windows must not mix


def window_partition(x: Tensor, window: int) -> Tensor:
    """(B, Hp, Wp, C) -> (B * nW, window * window, C); windows in row-major order."""
    B, Hp, Wp, C = x.shape
    x = x.reshape(B, Hp // window, window, Wp // window, window, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window * window, C)


def window_merge(windows: Tensor, window: int, Hp: int, Wp: int) -> Tensor:
    """Inverse of ``window_partition``: (B * nW, window * window, C) -> (B, Hp, Wp, C)."""
    C = windows.shape[-1]
    x = windows.reshape(-1, Hp // window, Wp // window, window, window, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, Hp, Wp, C)


def pad_amount(n: int, multiple: int) -> int:
    """How many rows/columns bring ``n`` up to a multiple of ``multiple`` (0 if it is one)."""
    return (multiple - n % multiple) % multiple


def relative_position_index(window: int) -> Tensor:
    """(N, N) int64 index into the ((2w-1)^2, heads) bias table, N = w*w tokens of a window.

    Entry (i, j) is ``(dh + w - 1) * (2w - 1) + (dw + w - 1)`` with (dh, dw) = position of
    token i minus position of token j, tokens numbered row-major.
    """
    rows, cols = torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
    coords = torch.stack([rows.flatten(), cols.flatten()])  # (2, N)
    rel = coords[:, :, None] - coords[:, None, :] + (window - 1)  # (2, N, N), each in [0, 2w-2]
    return rel[0] * (2 * window - 1) + rel[1]


def _region_ids(n: int, window: int, shift: int, device: torch.device) -> Tensor:
    """Region of each position along one axis of the rolled, padded map (length ``n``).

    0 for [0, n - window), 1 for [n - window, n - shift), 2 for the last ``shift`` positions,
    which hold the tokens that the roll by -shift wrapped around from the start of the map.
    """
    idx = torch.arange(n, device=device)
    return (idx >= n - window).long() + (idx >= n - shift).long()


def shifted_window_mask(
    Hp: int, Wp: int, window: int, shift: int, dtype: torch.dtype, device: torch.device
) -> Tensor:
    """Additive attention mask (nW, N, N) for shifted windows on a padded (Hp, Wp) map.

    After the roll by -shift, a window may hold tokens from non-adjacent parts of the map;
    pairs from different regions get ``MASK_VALUE``, all other pairs 0.
    """
    labels = _region_ids(Hp, window, shift, device)[:, None] * 3 + _region_ids(Wp, window, shift, device)
    labels = window_partition(labels[None, :, :, None], window).reshape(-1, window * window)  # (nW, N)
    differ = labels[:, None, :] != labels[:, :, None]
    return torch.zeros(differ.shape, dtype=dtype, device=device).masked_fill(differ, MASK_VALUE)


class WindowAttention(nn.Module):
    """Multi-head self-attention inside each window, with a learned relative position bias."""

    def __init__(self, dim: int, window_size: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        self.window_size = window_size
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * window_size - 1) ** 2, num_heads)
        )
        self.register_buffer("relative_position_index", relative_position_index(window_size))
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.matmul1 = MatMul()
        self.matmul2 = MatMul()
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def relative_position_bias(self) -> Tensor:
        """(heads, N, N) bias gathered from the table."""
        n = self.window_size * self.window_size
        bias = self.relative_position_bias_table[self.relative_position_index.reshape(-1)]
        return bias.reshape(n, n, self.num_heads).permute(2, 0, 1)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """x: (B * nW, N, C) windows; mask: (nW, N, N) additive, or None for unshifted windows."""
        Bw, N, C = x.shape
        qkv = self.qkv(x).reshape(Bw, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = self.matmul1(q * self.scale, k.transpose(-2, -1))
        attn = attn + self.relative_position_bias().unsqueeze(0)
        if mask is not None:
            nW = mask.shape[0]
            attn = attn.reshape(-1, nW, self.num_heads, N, N) + mask[None, :, None]
            attn = attn.reshape(-1, self.num_heads, N, N)
        attn = attn.softmax(dim=-1)
        out = self.matmul2(attn, v).transpose(1, 2).reshape(Bw, N, C)
        return self.proj(out)


class Mlp(nn.Module):
    """fc1 -> GELU (exact, erf) -> fc2."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SwinBlock(nn.Module):
    """One Swin block: (shifted) window attention and an MLP, each with a pre-norm residual.

    ``pad_value`` (a (C,) buffer, None by default) is what tokens padded after ``norm1`` hold;
    None means zeros, as in the reference. The quantization room sets it so that padding stays
    exact after norm1 is reparameterized.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int = 7,
        shift_size: int = 0,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
    ) -> None:
        super().__init__()
        if not 0 <= shift_size < window_size:
            raise ValueError(f"SwinBlock: shift_size {shift_size} not in [0, {window_size})")
        self.dim = dim
        self.window_size = window_size
        self.shift_size = shift_size
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window_size, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.register_buffer("pad_value", None)

    def pad_to_windows(self, x: Tensor) -> Tensor:
        """Pad (B, H, W, C) on the right and bottom to window multiples, with ``pad_value``.

        Built by concatenation so padded tokens equal ``pad_value`` exactly; the pad widths may
        be 0 (always concatenating keeps one traced path for every input size).
        """
        B, H, W, C = x.shape
        pad_r = pad_amount(W, self.window_size)
        pad_b = pad_amount(H, self.window_size)
        fill = self.pad_value if self.pad_value is not None else x.new_zeros(self.dim)
        fill = fill.to(x.dtype)
        x = torch.cat([x, fill.expand(B, H, pad_r, C)], dim=2)
        return torch.cat([x, fill.expand(B, pad_b, W + pad_r, C)], dim=1)

    def forward(self, x: Tensor, H: int, W: int, attn_mask: Tensor | None) -> Tensor:
        """x: (B, H*W, C) tokens; attn_mask: the stage's shift mask (used if this block shifts)."""
        B = x.shape[0]
        w, s = self.window_size, self.shift_size
        shortcut = x
        x = self.pad_to_windows(self.norm1(x).reshape(B, H, W, self.dim))
        Hp, Wp = x.shape[1], x.shape[2]
        if s > 0:
            x = torch.roll(x, shifts=(-s, -s), dims=(1, 2))
        windows = self.attn(window_partition(x, w), attn_mask if s > 0 else None)
        x = window_merge(windows, w, Hp, Wp)
        if s > 0:
            x = torch.roll(x, shifts=(s, s), dims=(1, 2))
        x = x[:, :H, :W, :].reshape(B, H * W, self.dim)
        x = shortcut + x
        return x + self.mlp(self.norm2(x))


class PatchMerging(nn.Module):
    """2x2 neighbourhood -> one token: (B, H*W, C) -> (B, ceil(H/2)*ceil(W/2), 2C).

    Odd sizes are zero-padded on the right/bottom before the concat and ``norm``.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x: Tensor, H: int, W: int) -> Tensor:
        B = x.shape[0]
        x = x.reshape(B, H, W, self.dim)
        x = F.pad(x, (0, 0, 0, W % 2, 0, H % 2))
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
        return self.reduction(self.norm(x.reshape(B, -1, 4 * self.dim)))


class BasicLayer(nn.Module):
    """One stage: ``depth`` blocks alternating shift 0 / window//2, then optional PatchMerging."""

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        window_size: int = 7,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        downsample: bool = False,
    ) -> None:
        super().__init__()
        self.window_size = window_size
        self.shift_size = window_size // 2
        self.blocks = nn.ModuleList(
            SwinBlock(dim, num_heads, window_size, 0 if j % 2 == 0 else self.shift_size, mlp_ratio, qkv_bias)
            for j in range(depth)
        )
        self.downsample = PatchMerging(dim) if downsample else None

    def forward(self, x: Tensor, H: int, W: int) -> tuple[Tensor, Tensor | None]:
        """Returns (stage output (B, H*W, C), downsampled tokens or None)."""
        mask = None
        if any(blk.shift_size > 0 for blk in self.blocks):
            Hp = H + pad_amount(H, self.window_size)
            Wp = W + pad_amount(W, self.window_size)
            mask = shifted_window_mask(Hp, Wp, self.window_size, self.shift_size, x.dtype, x.device)
        for blk in self.blocks:
            x = blk(x, H, W, mask)
        down = self.downsample(x, H, W) if self.downsample is not None else None
        return x, down


class PatchEmbed(nn.Module):
    """Image -> tokens: pad right/bottom to a patch multiple, conv ``proj`` (k = s = patch), ``norm``."""

    def __init__(self, patch_size: int = 4, in_chans: int = 3, embed_dim: int = 96) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: Tensor) -> tuple[Tensor, int, int]:
        """(B, 3, H, W) -> ((B, Hq*Wq, C) tokens, Hq, Wq) with Hq = ceil(H / patch)."""
        p = self.patch_size
        x = F.pad(x, (0, pad_amount(x.shape[3], p), 0, pad_amount(x.shape[2], p)))
        x = self.proj(x)
        H, W = x.shape[2], x.shape[3]
        return self.norm(x.flatten(2).transpose(1, 2)), H, W


class SwinTransformer(nn.Module):
    """Swin backbone: returns one NCHW map per ``out_indices`` stage (strides 4, 8, 16, 32)."""

    def __init__(
        self,
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: int = 7,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        patch_size: int = 4,
        in_chans: int = 3,
        out_indices: Sequence[int] = (0, 1, 2, 3),
    ) -> None:
        super().__init__()
        num_stages = len(depths)
        self.num_features = [embed_dim * 2**i for i in range(num_stages)]
        _check_arch(self.num_features, depths, num_heads, window_size, patch_size, out_indices)
        self.out_indices = tuple(out_indices)
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.layers = nn.ModuleList(
            BasicLayer(
                self.num_features[i], depths[i], num_heads[i], window_size, mlp_ratio, qkv_bias,
                downsample=i < num_stages - 1,
            )
            for i in range(num_stages)
        )
        for i in self.out_indices:
            self.add_module(f"norm{i}", nn.LayerNorm(self.num_features[i]))
        self.apply(_init_weights)

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        """(B, in_chans, H, W) -> tuple of (B, C_i, ceil(H / (4 * 2^i)), ceil(W / (4 * 2^i)))."""
        x, H, W = self.patch_embed(x)
        outs = []
        for i, layer in enumerate(self.layers):
            out, down = layer(x, H, W)
            if i in self.out_indices:
                out = getattr(self, f"norm{i}")(out)
                outs.append(out.reshape(-1, H, W, self.num_features[i]).permute(0, 3, 1, 2).contiguous())
            if down is not None:
                x, H, W = down, (H + 1) // 2, (W + 1) // 2
        return tuple(outs)


def _check_arch(
    dims: list[int],
    depths: Sequence[int],
    num_heads: Sequence[int],
    window_size: int,
    patch_size: int,
    out_indices: Sequence[int],
) -> None:
    """Raise ValueError for an architecture that cannot be built."""
    if len(num_heads) != len(depths):
        raise ValueError(f"SwinTransformer: {len(depths)} depths but {len(num_heads)} num_heads")
    for i, (dim, heads) in enumerate(zip(dims, num_heads)):
        if heads < 1 or dim % heads:
            raise ValueError(f"SwinTransformer: stage {i} width {dim} not divisible by {heads} heads")
    if window_size < 1 or patch_size < 1:
        raise ValueError(f"SwinTransformer: window_size {window_size}, patch_size {patch_size} must be >= 1")
    bad = [i for i in out_indices if not 0 <= i < len(depths)]
    if bad:
        raise ValueError(f"SwinTransformer: out_indices {bad} outside 0..{len(depths) - 1}")


def _init_weights(m: nn.Module) -> None:
    """The reference's initialisation: Linear ~ trunc_normal(0.02) with zero bias, LayerNorm 1/0."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
