"""Memory-bounded attentions in plain PyTorch: what `kernels="auto"` runs where the fused Triton kernels cannot
(CPU, Apple MPS, GPUs without Triton).

Both ops call `F.scaled_dot_product_attention` (SDPA) on chunks whose score matrices stay under
`CHUNK_BYTES`, so peak memory grows with the image and never with N x N' (RG-SA) or with the whole image's
window scores (L-SA). On a CPU, SDPA's flash kernel never writes the scores at all and fuses scale, additive
mask and softmax into the matmuls, which is where most of the reference's time goes (bmm, add, softmax,
copies). That kernel needs equal q/k and v head dims and a 4-D mask broadcastable to the scores, hence the
zero-padding of RG-SA's q and k and the per-window-row tables below. Results equal `rgt.ops.reference` up to
rounding (the reference stays the float64 oracle).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from rgt.ops import reference

CHUNK_BYTES = 256 * 2**20  # scores of one SDPA call (what its math fallback would materialise), per chunk


def _pad_head_dim(t: Tensor, d: int) -> Tensor:
    """Zero-pad the last dim to d: zero columns add nothing to q k^T, and zero v columns are sliced off."""
    return t if t.shape[-1] == d else F.pad(t, (0, d - t.shape[-1]))


def rgsa_attention(q: Tensor, k: Tensor, v: Tensor, scale: float, *, chunk_bytes: int = CHUNK_BYTES) -> Tensor:
    """softmax(q k^T * scale) v in query chunks of at most `chunk_bytes` of scores.

    Args:
        q: (B, h, N, dqk). k: (B, h, N', dqk). v: (B, h, N', dv). Any strides.
        scale: multiplies the logits.
    Returns:
        (B, h, N, dv).

    Performance:
        chunk_bytes: bound on B*h*rows*N'*itemsize per SDPA call. q and k are zero-padded to max(dqk, dv)
            (15 -> 30 in RGT), which is exact and lets the CPU flash kernel run instead of the math path.
    """
    dv = v.shape[-1]
    d = max(q.shape[-1], dv)
    q, k, v = (_pad_head_dim(t, d) for t in (q, k, v))
    B, h, N, _ = q.shape
    rows = max(1, chunk_bytes // max(1, B * h * k.shape[2] * q.element_size()))
    out = _cat([F.scaled_dot_product_attention(q[:, :, i : i + rows], k, v, scale=scale)
                for i in range(0, max(N, 1), rows)], 2)
    return out if out.shape[-1] == dv else out[..., :dv]


def row_masks(Hp: int, Wp: int, hs: int, ws: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """(R, Wp // ws, N, N) shift masks of one window row: R = 2 (any row but the last, the last row) or R = 1
    when there is a single row. Every window row but the last has the same masks as row 0, so this is all of
    `reference.shift_mask` (nW, N, N) in O(width) memory instead of O(image). Cached by `shift_mask`."""
    rows = reference.shift_mask(min(Hp, 2 * hs), Wp, hs, ws, device, dtype)  # a band-0 row, then the last row
    return rows.view(-1, Wp // ws, hs * ws, hs * ws)


def _window_bias(bias_table: Tensor, hs: int, ws: int) -> Tensor:
    """(hb, N, N) relative-position bias of one branch, gathered from its (M, hb) table."""
    N = hs * ws
    index = reference.relative_position_index(hs, ws, bias_table.device)
    return bias_table[index.view(-1)].view(N, N, -1).permute(2, 0, 1).contiguous()


def _roll_crop_into(dst: Tensor, src: Tensor, sh: int, sw: int) -> None:
    """dst = torch.roll(src, (sh, sw), dims=(1, 2))[:, :H, :W] in at most four copies, without the rolled
    temporary. src: (B, Hp, Wp, ...); dst: (B, H, W, ...) with H <= Hp, W <= Wp; 0 <= sh < Hp, 0 <= sw < Wp."""
    H, W = dst.shape[1:3]
    Hp, Wp = src.shape[1:3]
    for d0, s0, n0 in ((0, Hp - sh, min(sh, H)), (sh, 0, H - sh)):
        for d1, s1, n1 in ((0, Wp - sw, min(sw, W)), (sw, 0, W - sw)):
            if n0 > 0 and n1 > 0:
                dst[:, d0 : d0 + n0, d1 : d1 + n1].copy_(src[:, s0 : s0 + n0, s1 : s1 + n1])


def _row_chunks(nH: int, rows: int, shift: bool):
    """(first, last + 1) window rows per chunk; with a shift the last row (its own masks) is a chunk alone."""
    body = nH - 1 if shift else nH
    yield from ((r, min(r + rows, body)) for r in range(0, body, rows))
    if shift:
        yield nH - 1, nH


def _branch(x: Tensor, dst: Tensor, bias: Tensor, hs: int, ws: int, shift: bool, scale: float,
            chunk_bytes: int) -> None:
    """One L-SA branch. x: (B, Hp, Wp, 3, hb, hd) padded q|k|v; dst: (B, H, W, hb, hd) output view."""
    B, Hp, Wp, _, hb, hd = x.shape
    nH, nWc, N = Hp // hs, Wp // ws, hs * ws
    if shift:  # one pass, where torch.roll makes one per dim
        rolled = x.new_empty(x.shape)
        _roll_crop_into(rolled, x, Hp - hs // 2, Wp - ws // 2)
        x = rolled
    # (3, B, nH, nWc*hb, N, hd): windows of a row and their heads side by side, so that one mask row broadcasts
    win = x.reshape(B, nH, hs, nWc, ws, 3, hb, hd).permute(5, 0, 1, 3, 6, 2, 4, 7).reshape(3, B, nH, nWc * hb,
                                                                                           N, hd)
    if shift:  # (R, 1, nWc*hb, N, N): bias and shift mask folded into one additive table per row kind
        table = (row_masks(Hp, Wp, hs, ws, x.device, x.dtype)[:, :, None] + bias).reshape(-1, 1, nWc * hb, N, N)
    else:
        table = bias[None]  # (1, hb, N, N), q seen as (windows, hb, N, hd)
    # Outputs in image order. Without autograd each chunk is copied into place (straight into dst when there
    # is neither shift nor padding); with autograd they are joined by cat, because autograd would copy the
    # whole buffer once per in-place chunk.
    grad = torch.is_grad_enabled() and (x.requires_grad or bias.requires_grad)
    direct = not shift and dst.shape[1:3] == (Hp, Wp)
    img = None if grad else (dst if direct else x.new_empty(B, Hp, Wp, hb, hd))
    per_window = hb * N * N * x.element_size()
    cols = min(nWc, max(1, chunk_bytes // per_window))
    rows = max(1, chunk_bytes // (per_window * nWc)) if cols == nWc else 1
    ys = []
    for b in range(B):
        for r0, r1 in _row_chunks(nH, rows, shift):
            parts = []
            for c0 in range(0, nWc, cols):
                c1 = min(c0 + cols, nWc)
                q, k, v = (t[b, r0:r1, c0 * hb : c1 * hb] for t in win)  # (rows, cols*hb, N, hd)
                if shift:
                    mask = table[-1 if r1 == nH else 0][:, c0 * hb : c1 * hb]
                else:  # rows * cols windows of hb heads; contiguous, as cols < nWc only for a single row
                    q, k, v = (t.reshape(-1, hb, N, hd) for t in (q, k, v))
                    mask = table
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
                # (rows, cols, hb, N, hd) as views: SDPA may return its output in (batch, N, heads, hd) memory
                y = y.unflatten(1, (c1 - c0, hb)) if shift else y.unflatten(0, (r1 - r0, c1 - c0))
                if img is None:
                    parts.append(y)
                else:
                    img[b, r0 * hs : r1 * hs, c0 * ws : c1 * ws].view(r1 - r0, hs, c1 - c0, ws, hb, hd).copy_(
                        y.unflatten(3, (hs, ws)).permute(0, 3, 1, 4, 2, 5))
            ys.append(_cat(parts, 1) if parts else None)
    if img is None:
        y = _cat(ys, 0).unflatten(0, (B, nH)).unflatten(-2, (hs, ws))  # (B, nH, nWc, hb, hs, ws, hd)
        img = y.permute(0, 1, 4, 2, 5, 3, 6).reshape(B, Hp, Wp, hb, hd)  # image order
    if img is not dst:
        _roll_crop_into(dst, img, hs // 2 if shift else 0, ws // 2 if shift else 0)


def _cat(parts: list[Tensor], dim: int) -> Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim)


def rwin_attention(qkv: Tensor, bias_table: Tensor, H: int, W: int, split: tuple[int, int], shift: bool,
                   heads: int, scale: float, *, chunk_bytes: int = CHUNK_BYTES) -> Tensor:
    """Rectangle-window attention of L-SA with the semantics of `reference.rwin_attention`, window rows in chunks.

    Args:
        qkv: (B, H*W, 3C), features [q | k | v]. bias_table: (2, M, heads // 2).
        H, W, split, shift, heads, scale: as in `reference.rwin_attention`.
    Returns:
        (B, H*W, C), channels [branch 0 | branch 1].

    Performance:
        chunk_bytes: bound on the scores of one SDPA call (window rows, or columns of one row). Per branch
            the copies are: the zero padding (only when H, W are not multiples of max(split)), the roll (shifted
            blocks), one into window order for q, k and v together, and one back into place (two for shifted or
            padded blocks, and one more with autograd, which gets the chunks joined by cat).
    """
    B, L, C3 = qkv.shape
    C = C3 // 3
    hb = heads // 2
    hd = C // 2 // hb
    Hp, Wp = reference.padded_size(H, W, split)
    x = qkv.view(B, H, W, C3)
    if (Hp, Wp) != (H, W):
        x = F.pad(x, (0, 0, 0, Wp - W, 0, Hp - H))  # zero q, k, v: padded tokens still act as keys
    x = x.view(B, Hp, Wp, 3, 2, hb, hd)  # channel = j*C + branch*C/2 + head*hd + d
    out = qkv.new_empty(B, H, W, 2, hb, hd)
    for i in range(2):
        hs, ws = reference.branch_geometry(split, i)
        bias = _window_bias(bias_table[i], hs, ws).to(qkv.dtype)
        _branch(x[:, :, :, :, i], out[:, :, :, i], bias, hs, ws, shift, scale, chunk_bytes)
    return out.view(B, L, C)
