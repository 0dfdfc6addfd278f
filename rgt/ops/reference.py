"""Plain-PyTorch versions of every RGT op: the oracle for the fused kernels, and the portable path.

Each function reproduces the official code's arithmetic in the same order, so float64 results match it to
rounding (~1e-15 relative per op). Geometry tables (window masks, relative-position indices) are built once
per (geometry, device, dtype) and cached instead of rebuilt every forward.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

MASK_VALUE = -100.0  # Swin-style logit penalty between tokens of different shift regions.


def recursive_dwconv(x: Tensor, weight: Tensor, bias: Tensor | None, times: int) -> Tensor:
    """Apply one depthwise k x k convolution with stride k (no padding) `times` times, weights shared.

    Args:
        x: (B, C, H, W). weight: (C, 1, k, k). bias: (C,) or None.
    Returns:
        (B, C, H // k**times, W // k**times) with floor semantics at every level (leftover rows/cols dropped).
    """
    k = weight.shape[-1]
    for _ in range(times):
        x = F.conv2d(x, weight, bias, stride=k, groups=x.shape[1])
    return x


def rgsa_attention(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """Cross-attention of every token to the representative tokens: softmax(q k^T * scale) v.

    Args:
        q: (B, h, N, dqk). k: (B, h, N', dqk). v: (B, h, N', dv).
    Returns:
        (B, h, N, dv).
    """
    attn = (q @ k.transpose(-2, -1)) * scale  # (B, h, N, N'); the official code scales after the matmul
    return attn.softmax(dim=-1) @ v


def branch_geometry(split: tuple[int, int], branch: int) -> tuple[int, int]:
    """Window (height, width) of an L-SA branch: branch 0 is split[0] x split[1], branch 1 the transpose."""
    s0, s1 = split
    return (s0, s1) if branch == 0 else (s1, s0)


def padded_size(H: int, W: int, split: tuple[int, int]) -> tuple[int, int]:
    """L-SA pads both sides up to a multiple of max(split) (32 for the official [8, 32]), bottom/right."""
    p = max(split)
    return H + (-H) % p, W + (-W) % p


@functools.lru_cache(maxsize=64)
def relative_position_index(hs: int, ws: int, device: torch.device) -> Tensor:
    """(N, N) int64 row of the bias table for each query/key pair of an hs x ws window (N = hs*ws).

    index = (hi - hj + hs - 1) * (2*ws - 1) + (wi - wj + ws - 1), tokens row-major inside the window.
    """
    r = torch.arange(hs, device=device).repeat_interleave(ws)  # (N,) token row
    c = torch.arange(ws, device=device).repeat(hs)  # (N,) token column
    dr = r[:, None] - r[None, :] + hs - 1
    dc = c[:, None] - c[None, :] + ws - 1
    return dr * (2 * ws - 1) + dc


def relative_offsets(hs: int, ws: int) -> Tensor:
    """(M, 2) float32 raw offsets (dh, dw), dh outer, M = (2hs-1)(2ws-1): the input of the bias MLP."""
    dh = torch.arange(1 - hs, hs, dtype=torch.float32)
    dw = torch.arange(1 - ws, ws, dtype=torch.float32)
    return torch.stack(torch.meshgrid(dh, dw, indexing="ij"), dim=-1).reshape(-1, 2)


def window_partition(x: Tensor, hs: int, ws: int) -> Tensor:
    """(B, Hp, Wp, C) -> (B * nW, hs * ws, C), windows row-major per image, tokens row-major per window."""
    B, Hp, Wp, C = x.shape
    x = x.view(B, Hp // hs, hs, Wp // ws, ws, C).permute(0, 1, 3, 2, 4, 5)  # (B, nH, nW, hs, ws, C)
    return x.reshape(-1, hs * ws, C)


def window_merge(x: Tensor, hs: int, ws: int, B: int, Hp: int, Wp: int) -> Tensor:
    """Inverse of window_partition: (B * nW, hs * ws, C) -> (B, Hp, Wp, C)."""
    x = x.view(B, Hp // hs, Wp // ws, hs, ws, -1).permute(0, 1, 3, 2, 4, 5)  # (B, nH, hs, nW, ws, C)
    return x.reshape(B, Hp, Wp, -1)


@functools.lru_cache(maxsize=64)
def shift_mask(Hp: int, Wp: int, hs: int, ws: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """(nW, N, N) additive mask of a shifted branch on the padded Hp x Wp grid: 0 in a region, -100 across.

    Regions are the 3 x 3 bands [0, Hp-hs), [Hp-hs, Hp-hs/2), [Hp-hs/2, Hp) on rows (the same on columns with
    ws): after the cyclic shift by (hs/2, ws/2) these are the pieces that were not neighbours in the image.
    Built in `dtype` so reduced-precision models add it without promotion (the official fp16/bf16 crash).
    """

    def bands(n: int, w: int) -> Tensor:
        idx = torch.arange(n, device=device)
        return (idx >= n - w).long() + (idx >= n - w // 2).long()

    region = bands(Hp, hs)[:, None] * 3 + bands(Wp, ws)[None, :]  # (Hp, Wp)
    ids = window_partition(region[None, :, :, None], hs, ws).squeeze(-1)  # (nW, N)
    diff = ids[:, None, :] != ids[:, :, None]
    return torch.zeros(diff.shape, device=device, dtype=dtype).masked_fill_(diff, MASK_VALUE)


def _window_attention(
    q: Tensor, k: Tensor, v: Tensor, bias: Tensor, mask: Tensor | None, heads: int, scale: float
) -> Tensor:
    """Attention in windows. q, k, v: (B*nW, N, c); bias: (heads, N, N); mask: (nW, N, N) -> (B*nW, N, c)."""
    Bw, N, c = q.shape
    hd = c // heads
    q, k, v = (t.reshape(Bw, N, heads, hd).transpose(1, 2) for t in (q, k, v))  # (B*nW, heads, N, hd)
    attn = (q * scale) @ k.transpose(-2, -1) + bias.unsqueeze(0)  # (B*nW, heads, N, N)
    if mask is not None:
        nW = mask.shape[0]
        attn = (attn.view(Bw // nW, nW, heads, N, N) + mask[None, :, None]).view(Bw, heads, N, N)
    out = attn.softmax(dim=-1) @ v
    return out.transpose(1, 2).reshape(Bw, N, c)


def rwin_attention(
    qkv: Tensor,
    bias_table: Tensor,
    H: int,
    W: int,
    split: tuple[int, int],
    shift: bool,
    heads: int,
    scale: float,
) -> Tensor:
    """Rectangle-window self-attention of L-SA (both branches), in the official padding/shift/mask semantics.

    The projection output is zero-padded bottom/right to a multiple of max(split) (padded tokens have
    q = k = v = 0 and still act as keys), split by channels into two branches (first half: split[0] x split[1]
    windows, second half: the transpose), cyclically shifted by half a window with region masks when `shift`,
    attended per window and head with the gathered relative-position bias, shifted back, cropped and
    concatenated.

    Args:
        qkv: (B, H*W, 3C) tokens row-major, features laid out [q | k | v].
        bias_table: (2, M, heads // 2) per-branch bias table, M = (2*split[0]-1) * (2*split[1]-1), rows in the
            order of `relative_position_index` for that branch's window.
        heads: total heads; each branch has heads // 2 of size (C/2) / (heads // 2).
    Returns:
        (B, H*W, C), channels [branch 0 | branch 1].
    """
    B, L, C3 = qkv.shape
    C = C3 // 3
    Hp, Wp = padded_size(H, W, split)
    x = F.pad(qkv.view(B, H, W, C3), (0, 0, 0, Wp - W, 0, Hp - H))  # (B, Hp, Wp, 3C), zeros after the Linear
    hb, half = heads // 2, C // 2
    outs = []
    for i in range(2):
        hs, ws = branch_geometry(split, i)
        q, k, v = (x[..., j * C + i * half : j * C + (i + 1) * half] for j in range(3))  # (B, Hp, Wp, C/2)
        mask = None
        if shift:
            q, k, v = (torch.roll(t, shifts=(-(hs // 2), -(ws // 2)), dims=(1, 2)) for t in (q, k, v))
            mask = shift_mask(Hp, Wp, hs, ws, qkv.device, qkv.dtype)
        index = relative_position_index(hs, ws, qkv.device)
        bias = bias_table[i][index.view(-1)].view(hs * ws, hs * ws, hb).permute(2, 0, 1)  # (hb, N, N)
        q, k, v = (window_partition(t, hs, ws) for t in (q, k, v))
        out = window_merge(_window_attention(q, k, v, bias, mask, hb, scale), hs, ws, B, Hp, Wp)
        if shift:
            out = torch.roll(out, shifts=(hs // 2, ws // 2), dims=(1, 2))
        outs.append(out[:, :H, :W].reshape(B, L, half))
    return torch.cat(outs, dim=-1)
