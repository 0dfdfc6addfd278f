"""Overlapping tiles with smooth blending, and the padding that makes any image a valid RGT input.

RG-SA attends over the whole image, so a tile sees less context than the full image and tiling changes the
output slightly (measured in tests/test_upscale_tiling.py and the README). Where tiles overlap, each output
pixel is the weighted mean of the tiles that cover it; a tile's weight falls from 1 to ~0 across the overlap
as sin^2, so the mix changes gradually and no tile edge shows (hard-cropped tiles, as in Real-ESRGAN, leave
visible seams). Image borders get weight 1: there is no neighbour to blend with.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from rgt.arch.rgsa import MIN_EVAL_SIDE, recursion_depth

__all__ = ["MIN_TILE", "pad_to_valid", "reflect_pad", "tile_starts", "tiled_forward", "valid_size"]

MIN_TILE = MIN_EVAL_SIDE  # the model minimum; a tile this small leaves RG-SA little context


def valid_size(H: int, W: int) -> tuple[int, int]:
    """The smallest (H', W') >= (H, W) that RGT accepts in eval mode.

    Both sides must be >= 16, and the shorter side >= 4^T, where T recursions of RG-SA's stride-4 conv are
    set by the longer side (T = 3 from 1024 px: a 16 x 1100 strip needs padding to 64 x 1100).
    """
    H, W = max(H, MIN_EVAL_SIDE), max(W, MIN_EVAL_SIDE)
    side = max(H, W)
    need = 4 ** recursion_depth(side, side, training=False)
    return (max(H, need), W) if H < W else (H, max(W, need))


def reflect_pad(x: Tensor, pad_h: int, pad_w: int) -> Tensor:
    """Reflect-pad bottom/right by any amount (F.pad's reflect needs pad < size: repeat, replicate at size 1)."""
    while pad_h > 0 or pad_w > 0:
        h, w = x.shape[-2:]
        ph, pw = min(pad_h, h - 1), min(pad_w, w - 1)
        if (pad_h and ph == 0) or (pad_w and pw == 0):  # a 1-px side cannot be reflected
            return F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
        x = F.pad(x, (0, pw, 0, ph), mode="reflect")
        pad_h, pad_w = pad_h - ph, pad_w - pw
    return x


def pad_to_valid(x: Tensor) -> tuple[Tensor, tuple[int, int]]:
    """(B, C, H, W) -> (B, C, H', W') reflect-padded at the bottom/right to `valid_size`, and (H, W) to crop."""
    H, W = x.shape[-2:]
    Hp, Wp = valid_size(H, W)
    return reflect_pad(x, Hp - H, Wp - W), (H, W)


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Offsets of tiles of length `tile` covering [0, size), neighbours sharing >= overlap px; the last
    tile ends at `size` (it may overlap its neighbour more)."""
    if size <= tile:
        return [0]
    return list(range(0, size - tile, tile - overlap)) + [size - tile]


def _ramp(length: int, ramp: int, head: bool, tail: bool, device: torch.device) -> Tensor:
    """(length,) weights: 1, rising as sin^2 over the first `ramp` px if head, falling over the last if tail.

    The half-pixel offset keeps every weight > 0, so the normalising sum never vanishes.
    """
    w = torch.ones(length, device=device)
    if ramp > 0:
        rise = torch.sin(0.5 * math.pi * (torch.arange(ramp, device=device) + 0.5) / ramp) ** 2
        if head:
            w[:ramp] = rise
        if tail:
            w[length - ramp :] = rise.flip(0)
    return w


def tiled_forward(
    fn: Callable[[Tensor], Tensor],
    x: Tensor,
    scale: int,
    tile: int | tuple[int, int],
    overlap: int,
    *,
    progress: bool = False,
) -> Tensor:
    """Run `fn` ((B, C, h, w) -> (B, C, s h, s w)) on overlapping tile x tile crops of x and blend.

    Args:
        x: (B, C, H, W). tile: tile side in input px, or (height, width) (clipped to the image). overlap: input
            px shared by neighbouring tiles, < tile / 2 (the two ramps of a tile must not cross).

    Returns:
        (B, C, sH, sW) float32 on x's device.
    """
    tile_h, tile_w = (tile, tile) if isinstance(tile, int) else tile
    if 2 * overlap >= min(tile_h, tile_w) or overlap < 0:
        raise ValueError(f"tile overlap must be in [0, tile/2), got overlap {overlap} for tile {tile}")
    B, C, H, W = x.shape
    th, tw = min(tile_h, H), min(tile_w, W)
    ys, xs = tile_starts(H, th, overlap), tile_starts(W, tw, overlap)
    out = torch.zeros(B, C, H * scale, W * scale, device=x.device)
    total = torch.zeros(1, 1, H * scale, W * scale, device=x.device)
    cells = list(itertools.product(range(len(ys)), range(len(xs))))
    for i, j in tqdm(cells, desc="tiles", unit="tile", leave=False, disable=not progress or len(cells) == 1):
        y0, x0 = ys[i], xs[j]
        sr = fn(x[..., y0 : y0 + th, x0 : x0 + tw]).float()  # (B, C, s th, s tw)
        wy = _ramp(th * scale, overlap * scale, i > 0, i < len(ys) - 1, x.device)
        wx = _ramp(tw * scale, overlap * scale, j > 0, j < len(xs) - 1, x.device)
        w = wy[:, None] * wx[None, :]  # (s th, s tw)
        rows, cols = slice(y0 * scale, (y0 + th) * scale), slice(x0 * scale, (x0 + tw) * scale)
        out[..., rows, cols] += sr * w
        total[..., rows, cols] += w
    return out / total
