"""Fused rectangle-window self-attention (Rwin-SA, the L-SA of RGT), forward and backward, in Triton.

Paper: rectangle-window attention from CAT (Chen et al., NeurIPS 2022) as used in RGT (Chen et al., ICLR
2024, "Recursive Generalization Transformer for Image Super-Resolution"), with the official code's padding,
shift and mask semantics. Oracle: `rgt.ops.reference.rwin_attention`.

Computes, per image, branch (0: s0 x s1 windows on channels [0, C/2); 1: s1 x s0 on [C/2, C)), window and
head: softmax((q * scale) k^T + bias + mask) v with the FlashAttention-2 recurrence and fp32 accumulation.
Changes against a plain windowed flash kernel:
- q/k/v are read straight from the qkv projection output (B, H*W, 3C); the result goes to (B, H*W, C). Zero
  padding to a multiple of max(split), the cyclic shift by half a window (on the padded map) and the window
  partition are index arithmetic on token coordinates. Padded tokens load as zeros, act as keys (bias-only
  logit) and are never stored. Shift regions (-100 across regions) come from the rolled padded coordinates.
- The relative-position bias is gathered from the (M, hb) table per score tile, never expanded per window.
- Backward: dq, dk, dv land in the same token layout (each real token lies in exactly one window, so no zero
  fill). Three kernels, each holding only (query tile x key tile) score tiles so none spills on sm_90: dk/dv
  (a key tile, looping over query tiles), dq (a query tile, looping over key tiles) and d(bias), which sums
  dS over all windows and images: each program owns one (query, key) tile of window-local positions,
  recomputes dS there for a chunk of windows and writes one (N, N) fp32 partial per chunk; the host sums
  the partials in a fixed order and folds them onto the table by relative offset. No atomics: the gradients
  are deterministic. Tiles and warps per kernel and dtype: CONFIGS.

Limits: head dim <= 64 (padded in-kernel to a power of two >= 16); windows of s0*s1 <= 256 tokens (the
d(bias) partials grow as N^2); max(split) a multiple of min(split); fp32 (IEEE dots, no TF32), fp16, bf16;
no dropout.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import INTERPRET, launch

MASK_VALUE = tl.constexpr(-100.0)  # Swin-style logit penalty across shift regions (reference.MASK_VALUE)
MAX_HEAD_DIM = 64
MAX_WINDOW = 256
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _window_tokens(t, win, hs, ws, H, W, Hp, Wp, N: tl.constexpr, EVEN: tl.constexpr, SHIFT: tl.constexpr):
    """Window-local token indices t of window `win` -> (image token index (int64), real?, bias code, region).

    `real` is False for the zero padding (y >= H or x >= W) and for tokens past N, which wrap onto real
    coordinates so every gather stays in bounds. Tokens are row-major in the window; the bias code
    r * (2ws-1) + c turns the table row of a query/key pair into one subtraction (see _bias_tile).
    """
    if not EVEN:
        inside = t < N
        t = t % N
    # Divisions in int32; the rest in int64, which the addresses need anyway (and which the interpreter does
    # not overflow-check op by op: that check dominates its run time). Vectors of one tile: cheap on a GPU.
    r = (t // ws).to(tl.int64)
    c = (t % ws).to(tl.int64)
    nwx = Wp // ws
    y = r + (win // nwx) * hs  # coordinates on the (rolled) padded map
    x = c + (win % nwx) * ws
    if SHIFT:
        # Region bands [0, Hp-hs), [Hp-hs, Hp-hs/2), [Hp-hs/2, Hp), same on columns: as reference.shift_mask.
        region = ((y >= Hp - hs).to(tl.int32) + (y >= Hp - hs // 2).to(tl.int32)) * 3
        region += (x >= Wp - ws).to(tl.int32) + (x >= Wp - ws // 2).to(tl.int32)
        y = (y + hs // 2) % Hp  # roll by (-hs/2, -ws/2): rolled position y holds padded position y + hs/2
        x = (x + ws // 2) % Wp
    else:
        region = t  # unused without the shift
    real = (y < H) & (x < W)
    if not EVEN:
        real = real & inside
    return y * W + x, real, (r * (2 * ws - 1) + c).to(tl.int32), region


@triton.jit
def _bias_tile(BiasH, stride_bm, code_diff, hs, ws):
    """fp32 bias of query/key pairs from one head's table, code_diff = code(query) - code(key).

    Table row (r_q - r_k + hs - 1) * (2ws - 1) + (c_q - c_k + ws - 1) = code_diff + (hs-1) * (2ws-1) + ws-1.
    """
    return tl.load(BiasH + (code_diff + ((hs - 1) * (2 * ws - 1) + ws - 1)) * stride_bm).to(tl.float32)


@triton.jit
def _load_rows(Base, tok, real, stride_m, stride_c, ch, d, D):
    """(len(tok), BLOCK_D) tile of channels ch + d of tokens `tok`; zeros for padded tokens and d >= D."""
    ptrs = Base + tok[:, None] * stride_m + (ch + d).to(tl.int64)[None, :] * stride_c
    return tl.load(ptrs, mask=real[:, None] & (d < D)[None, :], other=0.0)


@triton.jit
def _branch_head(br, head, S0: tl.constexpr, S1: tl.constexpr, C, D):
    """Window height, width and the head's first channel inside q (k: + C, v: + 2C) of a branch: branch 0
    has S0 x S1 windows on channels [0, C/2), branch 1 S1 x S0 on [C/2, C)."""
    return S0 + (S1 - S0) * br, S1 + (S0 - S1) * br, br * (C // 2) + head * D


@triton.jit
def _window_program(TILES: tl.constexpr, QKV, Bias, stride_qz, stride_bt, stride_bh, H, W, C, HB, D,
                    S0: tl.constexpr, S1: tl.constexpr):
    """Program (window * TILES + tile, head, image * 2 + branch) -> (tile, window, image (int64), window height
    and width, the head's first q channel, the image's qkv, the head's bias table, its row of Lse and Delta)."""
    head = tl.program_id(1)
    zb = tl.program_id(2)
    hs, ws, ch = _branch_head(zb % 2, head, S0, S1, C, D)
    z = (zb // 2).to(tl.int64)
    return (tl.program_id(0) % TILES, tl.program_id(0) // TILES, z, hs, ws, ch, QKV + z * stride_qz,
            Bias + (zb % 2) * stride_bt + head * stride_bh, (zb * HB + head).to(tl.int64) * (H * W))


@triton.jit
def _logits(a, b, bias, reg_a, reg_b, SHIFT: tl.constexpr, DOT_PREC: tl.constexpr):
    """(len(a), len(b)) logits a b^T + bias, with the shift mask between tokens of different regions."""
    s = tl.dot(a, tl.trans(b), input_precision=DOT_PREC) + bias
    if SHIFT:
        s = tl.where(reg_a[:, None] == reg_b[None, :], s, s + MASK_VALUE)
    return s


@triton.jit
def _query_side(Base, DOz, Lse, Delta, Stats, tok_q, real_q, stride_qm, stride_qc, stride_dm, stride_dc,
                ch, d, D, scale):
    """What the backward needs of a query tile: q * scale (in q's dtype, as the reference), dout, lse and
    Delta. Padded queries get lse = +inf, so their P = 0: their outputs were dropped, they send no gradient."""
    q = _load_rows(Base, tok_q, real_q, stride_qm, stride_qc, ch, d, D)
    q = (q.to(tl.float32) * scale).to(q.dtype)
    do = _load_rows(DOz, tok_q, real_q, stride_dm, stride_dc, ch, d, D)
    lse = tl.load(Lse + Stats + tok_q, mask=real_q, other=float("inf"))
    delta = tl.load(Delta + Stats + tok_q, mask=real_q, other=0.0)
    return q, do, lse, delta


@triton.jit
def _key_side(Base, BiasH, stride_qm, stride_qc, stride_bm, tk, code_q, win, hs, ws, H, W, Hp, Wp, C, ch, d, D,
              N: tl.constexpr, EVEN: tl.constexpr, SHIFT: tl.constexpr):
    """What a query tile (bias codes code_q) needs of the key tile tk of window `win`: k, v, the fp32 bias
    tile (queries x keys) and the keys' shift regions."""
    tok_k, real_k, code_k, reg_k = _window_tokens(tk, win, hs, ws, H, W, Hp, Wp, N, EVEN, SHIFT)
    k = _load_rows(Base, tok_k, real_k, stride_qm, stride_qc, C + ch, d, D)
    v = _load_rows(Base, tok_k, real_k, stride_qm, stride_qc, 2 * C + ch, d, D)
    return k, v, _bias_tile(BiasH, stride_bm, code_q[:, None] - code_k[None, :], hs, ws), reg_k


@triton.jit
def _grad_logits(q, k, v, do, lse, delta, bias, reg_q, reg_k, SHIFT: tl.constexpr, DOT_PREC: tl.constexpr):
    """dS = P (dout v^T - Delta) of a (query, key) tile, P = exp(S - lse) recomputed from the logits S."""
    p = tl.exp(_logits(q, k, bias, reg_q, reg_k, SHIFT, DOT_PREC) - lse[:, None])
    return p * (tl.dot(do, tl.trans(v), input_precision=DOT_PREC) - delta[:, None])


@triton.jit
def _rwin_attn_fwd_kernel(
    QKV, Bias, Out, Lse,
    stride_qz, stride_qm, stride_qc, stride_bt, stride_bm, stride_bh, stride_oz, stride_om,
    H, W, Hp, Wp, C, HB, D, scale,
    S0: tl.constexpr, S1: tl.constexpr, N: tl.constexpr, SHIFT: tl.constexpr, EVEN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """One program: BLOCK_M queries of one (window, head, image, branch) against the window's N keys.

    Out_i = sum_j softmax_j((q_i * scale) . k_j + bias(i, j) + mask_ij) v_j, online softmax over key tiles.
    Saves Lse (B, 2, hb, H*W) fp32, the logsumexp of each real query's logits, for the backward.
    """
    tile, win, z, hs, ws, ch, Base, BiasH, Stats = _window_program(
        (N + BLOCK_M - 1) // BLOCK_M, QKV, Bias, stride_qz, stride_bt, stride_bh, H, W, C, HB, D, S0, S1)
    d = tl.arange(0, BLOCK_D)
    tq = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    tok_q, real_q, code_q, reg_q = _window_tokens(tq, win, hs, ws, H, W, Hp, Wp, N, EVEN, SHIFT)
    q = _load_rows(Base, tok_q, real_q, stride_qm, stride_qc, ch, d, D)
    q = (q.to(tl.float32) * scale).to(q.dtype)  # the reference scales q before q k^T, in q's dtype

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(0, N, BLOCK_N):
        tk = start + tl.arange(0, BLOCK_N)
        k, v, bias, reg_k = _key_side(Base, BiasH, stride_qm, stride_qc, stride_bm, tk, code_q, win, hs, ws, H, W,
                                      Hp, Wp, C, ch, d, D, N, EVEN, SHIFT)
        s = _logits(q, k, bias, reg_q, reg_k, SHIFT, DOT_PREC)
        if not EVEN:
            s = tl.where((tk < N)[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m_i = m_new

    out = acc / l_i[:, None]
    optrs = Out + z * stride_oz + tok_q[:, None] * stride_om + (ch + d)[None, :]
    tl.store(optrs, out.to(Out.dtype.element_ty), mask=real_q[:, None] & (d < D)[None, :])
    tl.store(Lse + Stats + tok_q, m_i + tl.log(l_i), mask=real_q)


@triton.jit
def _rwin_attn_bwd_delta_kernel(
    Out, DO, Delta, stride_oz, stride_om, stride_dz, stride_dm, stride_dc, L, HB, D,
    BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Delta[z, br, h, l] = sum_d dOut * Out over one head's channels: the softmax-backward row term."""
    hh = tl.program_id(1)  # branch * HB + head: channels hh * D + d
    z = tl.program_id(2).to(tl.int64)
    tok = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
    d = tl.arange(0, BLOCK_D)
    mask = (tok < L)[:, None] & (d < D)[None, :]
    rows = tok.to(tl.int64)[:, None]
    cols = (hh * D + d).to(tl.int64)[None, :]
    o = tl.load(Out + z * stride_oz + rows * stride_om + cols, mask=mask, other=0.0)
    do = tl.load(DO + z * stride_dz + rows * stride_dm + cols * stride_dc, mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(Delta + (z * 2 * HB + hh) * L + tok, delta, mask=tok < L)


@triton.jit
def _rwin_attn_bwd_dkdv_kernel(
    QKV, Bias, DO, Lse, Delta, DQKV,
    stride_qz, stride_qm, stride_qc, stride_bt, stride_bm, stride_bh, stride_dz, stride_dm, stride_dc,
    stride_gz, stride_gm,
    H, W, Hp, Wp, C, HB, D, scale,
    S0: tl.constexpr, S1: tl.constexpr, N: tl.constexpr, SHIFT: tl.constexpr, EVEN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """One program: dk, dv of BLOCK_N keys of one (window, head, image, branch), looping over its queries.

    With P = exp(S - lse) recomputed: dv_j = sum_i P_ij dout_i; dS_ij = P_ij (dout_i . v_j - Delta_i);
    dk_j = sum_i dS_ij (q_i * scale). Works on (keys x queries) tiles so dk, dv need no transpose.
    """
    tile, win, z, hs, ws, ch, Base, BiasH, Stats = _window_program(
        (N + BLOCK_N - 1) // BLOCK_N, QKV, Bias, stride_qz, stride_bt, stride_bh, H, W, C, HB, D, S0, S1)
    d = tl.arange(0, BLOCK_D)
    tk = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    tok_k, real_k, code_k, reg_k = _window_tokens(tk, win, hs, ws, H, W, Hp, Wp, N, EVEN, SHIFT)
    k = _load_rows(Base, tok_k, real_k, stride_qm, stride_qc, C + ch, d, D)
    v = _load_rows(Base, tok_k, real_k, stride_qm, stride_qc, 2 * C + ch, d, D)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for start in range(0, N, BLOCK_M):
        tq = start + tl.arange(0, BLOCK_M)
        tok_q, real_q, code_q, reg_q = _window_tokens(tq, win, hs, ws, H, W, Hp, Wp, N, EVEN, SHIFT)
        q, do, lse, delta = _query_side(Base, DO + z * stride_dz, Lse, Delta, Stats, tok_q, real_q, stride_qm,
                                        stride_qc, stride_dm, stride_dc, ch, d, D, scale)
        bias = _bias_tile(BiasH, stride_bm, code_q[None, :] - code_k[:, None], hs, ws)
        pt = tl.exp(_logits(k, q, bias, reg_k, reg_q, SHIFT, DOT_PREC) - lse[None, :])
        dv += tl.dot(pt.to(do.dtype), do, input_precision=DOT_PREC)
        dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
        dst = pt * (dpt - delta[None, :])
        dk += tl.dot(dst.to(q.dtype), q, input_precision=DOT_PREC)

    ptrs = DQKV + z * stride_gz + tok_k[:, None] * stride_gm + (C + ch + d)[None, :]
    mask = real_k[:, None] & (d < D)[None, :]
    tl.store(ptrs, dk.to(DQKV.dtype.element_ty), mask=mask)
    tl.store(ptrs + C, dv.to(DQKV.dtype.element_ty), mask=mask)


@triton.jit
def _rwin_attn_bwd_dq_kernel(
    QKV, Bias, DO, Lse, Delta, DQKV,
    stride_qz, stride_qm, stride_qc, stride_bt, stride_bm, stride_bh, stride_dz, stride_dm, stride_dc,
    stride_gz, stride_gm,
    H, W, Hp, Wp, C, HB, D, scale,
    S0: tl.constexpr, S1: tl.constexpr, N: tl.constexpr, SHIFT: tl.constexpr, EVEN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """One program: dq of BLOCK_M queries of one (window, head, image, branch), looping over key tiles:
    dq_i = scale * sum_j dS_ij k_j."""
    tile, win, z, hs, ws, ch, Base, BiasH, Stats = _window_program(
        (N + BLOCK_M - 1) // BLOCK_M, QKV, Bias, stride_qz, stride_bt, stride_bh, H, W, C, HB, D, S0, S1)
    d = tl.arange(0, BLOCK_D)
    tq = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    tok_q, real_q, code_q, reg_q = _window_tokens(tq, win, hs, ws, H, W, Hp, Wp, N, EVEN, SHIFT)
    q, do, lse, delta = _query_side(Base, DO + z * stride_dz, Lse, Delta, Stats, tok_q, real_q, stride_qm,
                                    stride_qc, stride_dm, stride_dc, ch, d, D, scale)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(0, N, BLOCK_N):
        tk = start + tl.arange(0, BLOCK_N)
        k, v, bias, reg_k = _key_side(Base, BiasH, stride_qm, stride_qc, stride_bm, tk, code_q, win, hs, ws, H, W,
                                      Hp, Wp, C, ch, d, D, N, EVEN, SHIFT)
        ds = _grad_logits(q, k, v, do, lse, delta, bias, reg_q, reg_k, SHIFT, DOT_PREC)
        if not EVEN:  # keys past N wrap onto real tokens: drop them
            ds = tl.where((tk < N)[None, :], ds, 0.0)
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC)

    ptrs = DQKV + z * stride_gz + tok_q[:, None] * stride_gm + (ch + d)[None, :]
    tl.store(ptrs, (dq * scale).to(DQKV.dtype.element_ty), mask=real_q[:, None] & (d < D)[None, :])


@triton.jit
def _rwin_attn_bwd_dbias_kernel(
    QKV, Bias, DO, Lse, Delta, G,
    stride_qz, stride_qm, stride_qc, stride_bt, stride_bm, stride_bh, stride_dz, stride_dm, stride_dc,
    H, W, Hp, Wp, C, HB, D, scale, n_win, n_total, per_chunk,
    S0: tl.constexpr, S1: tl.constexpr, N: tl.constexpr, SHIFT: tl.constexpr, EVEN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """One program: G[chunk, br, h, i, j] = sum of dS_ij over a chunk of `per_chunk` windows (numbered over
    images x windows) for a BLOCK_M x BLOCK_N tile of window-local (query i, key j) positions.

    The host sums the chunks' partials in a fixed order and folds them onto the bias table: no atomics, a
    deterministic gradient. dS is recomputed (two dots and an exp per pair) rather than kept beside dq: a
    program that owns one (i, j) tile over many windows holds only that tile, never a whole key row.
    """
    N_TILES = (N + BLOCK_N - 1) // BLOCK_N
    head = tl.program_id(1)
    chunk = tl.program_id(2) // 2
    br = tl.program_id(2) % 2
    hs, ws, ch = _branch_head(br, head, S0, S1, C, D)
    d = tl.arange(0, BLOCK_D)
    tq = (tl.program_id(0) // N_TILES) * BLOCK_M + tl.arange(0, BLOCK_M)
    tk = (tl.program_id(0) % N_TILES) * BLOCK_N + tl.arange(0, BLOCK_N)
    # The bias depends only on window-local positions (the codes of window 0): gather it once per program.
    _, _, code_q, _ = _window_tokens(tq, 0, hs, ws, H, W, Hp, Wp, N, EVEN, SHIFT)
    _, _, code_k, _ = _window_tokens(tk, 0, hs, ws, H, W, Hp, Wp, N, EVEN, SHIFT)
    bias = _bias_tile(Bias + br * stride_bt + head * stride_bh, stride_bm, code_q[:, None] - code_k[None, :],
                      hs, ws)

    g = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    w_lo = chunk * per_chunk
    for wa in range(w_lo, tl.minimum(w_lo + per_chunk, n_total)):
        z = (wa // n_win).to(tl.int64)
        win = wa % n_win
        Base = QKV + z * stride_qz
        tok_q, real_q, _, reg_q = _window_tokens(tq, win, hs, ws, H, W, Hp, Wp, N, EVEN, SHIFT)
        tok_k, real_k, _, reg_k = _window_tokens(tk, win, hs, ws, H, W, Hp, Wp, N, EVEN, SHIFT)
        q, do, lse, delta = _query_side(Base, DO + z * stride_dz, Lse, Delta, ((z * 2 + br) * HB + head) * (H * W),
                                        tok_q, real_q, stride_qm, stride_qc, stride_dm, stride_dc, ch, d, D,
                                        scale)
        k = _load_rows(Base, tok_k, real_k, stride_qm, stride_qc, C + ch, d, D)
        v = _load_rows(Base, tok_k, real_k, stride_qm, stride_qc, 2 * C + ch, d, D)
        g += _grad_logits(q, k, v, do, lse, delta, bias, reg_q, reg_k, SHIFT, DOT_PREC)

    Gh = G + ((chunk * 2 + br) * HB + head).to(tl.int64) * (N * N)
    tl.store(Gh + tq[:, None] * N + tk[None, :], g, mask=(tq < N)[:, None] & (tk < N)[None, :])


# ----------------------------------------------------------------------------------------- launchers


Block = int | tuple[int, int] | None  # a launcher's tile override: one size, or (queries, keys)


@dataclass(frozen=True)
class Config:
    """Tiles and launch shape of one kernel: BLOCK_M queries x BLOCK_N keys per tile."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int = 2

    def kwargs(self) -> dict:
        return dict(BLOCK_M=self.block_m, BLOCK_N=self.block_n, num_warps=self.num_warps,
                    num_stages=self.num_stages)


# CONFIGS[kernel][fp32?]: the launchers' default first, then the candidates for autotuning on a GPU, for
# RGT's windows (8x32, head dim 30). Pruned by the sm_90 compiler (ptxas -v, Triton 3.6, 3.8 and 3.9, every
# RGT-S workload, shifted and not): none of these spills, but for two fp32 exceptions, and fp16/bf16 dots run
# on tensor cores (wgmma for 64-row tiles, mma.sync for 32). fp32 lists are short: IEEE dots compile to FFMA
# with a larger register footprint, and every other tile tried spilled on one Triton version or another.
# Exceptions (spill stores/loads per thread): the fp32 forward's 32x64 tiles on 8 warps spill 4/4 B on
# Triton 3.9's shifted blocks (0 on 3.6 and 3.8; no tile tried is spill-free on all three: 64x64 on 8 warps
# spilled 20 B on 3.6 and 44 B on 3.8, 32x32 on 4 warps 168 B on 3.6, 64x64 or 64x32 on 4 warps 12 B to
# 10 KB); the fp32 unshifted dk/dv on Triton 3.9 for maps whose sides are not multiples of 16 (the padded
# 250x250 and 750x1000 inference, where the backward never runs), 28/28 B (0 on 3.6).
# d(bias) runs one software-pipelining stage: the second stage's prefetched gathers cost registers and spill.
CONFIGS = {
    "fwd": {False: [Config(64, 64, 8), Config(64, 32, 4), Config(32, 64, 4)], True: [Config(32, 64, 8)]},
    "dkdv": {False: [Config(64, 64, 8), Config(32, 64, 4), Config(64, 32, 4)], True: [Config(64, 32, 4)]},
    "dq": {False: [Config(64, 64, 8), Config(64, 32, 4), Config(32, 64, 4)], True: [Config(64, 64, 8)]},
    "dbias": {False: [Config(64, 32, 4, 1), Config(64, 64, 8, 1), Config(32, 32, 4, 1)],
              True: [Config(64, 64, 8, 1), Config(32, 32, 4, 1)]},
}


@dataclass(frozen=True)
class Geometry:
    """Sizes of one call: B images of H x W tokens, C channels per q/k/v, hb heads of D channels a branch."""

    B: int
    H: int
    W: int
    C: int
    hb: int
    D: int
    s0: int
    s1: int
    Hp: int
    Wp: int

    @property
    def N(self) -> int:  # tokens per window
        return self.s0 * self.s1

    @property
    def n_win(self) -> int:  # windows per image and branch: Hp, Wp are multiples of max(split)
        return self.Hp * self.Wp // self.N

    @property
    def window_block(self) -> int:  # the power-of-two token tile >= 16 (tl.dot) that covers a window
        return max(16, triton.next_power_of_2(self.N))

    def args(self, scale: float) -> tuple:
        return (self.H, self.W, self.Hp, self.Wp, self.C, self.hb, self.D, float(scale))

    def constexprs(self, shift: bool, dtype: torch.dtype) -> dict:
        return dict(S0=self.s0, S1=self.s1, N=self.N, SHIFT=bool(shift), EVEN=self.N == self.window_block,
                    BLOCK_D=max(16, triton.next_power_of_2(self.D)),
                    DOT_PREC="ieee" if dtype == torch.float32 else "tf32")  # fp32 must not round to TF32

    def config(self, kernel: str, dtype: torch.dtype, block: Block) -> Config:
        """Launch config of `kernel`: CONFIGS' default on a GPU, or the tiles `block` if given, or the whole
        window in the interpreter (whose cost is per op, not per element); tiles capped at the window."""
        cfg = CONFIGS[kernel][dtype == torch.float32][0]
        if block is None and INTERPRET:
            block = self.window_block
        if block is not None:
            bm, bn = (block, block) if isinstance(block, int) else block
            if min(bm, bn) < 16 or bm & (bm - 1) or bn & (bn - 1):
                raise ValueError(f"block must be powers of two >= 16, got {block}")
            cfg = replace(cfg, block_m=bm, block_n=bn)
        return replace(cfg, block_m=min(cfg.block_m, self.window_block),
                       block_n=min(cfg.block_n, self.window_block))


def check_inputs(qkv: Tensor, bias_table: Tensor, H: int, W: int, split: tuple[int, int],
                 heads: int) -> Geometry:
    """Validate the arguments of the fused op and return its geometry; errors name the offending sizes."""
    if qkv.dim() != 3 or qkv.shape[2] % 6 != 0:
        raise ValueError(f"qkv must be (B, H*W, 3C) with C even, got {tuple(qkv.shape)}")
    B, L, C3 = qkv.shape
    C = C3 // 3
    if H < 1 or W < 1 or L != H * W:
        raise ValueError(f"qkv has {L} tokens but H*W = {H}*{W} = {H * W}")
    if qkv.dtype not in DTYPES or bias_table.dtype not in DTYPES:
        raise TypeError(f"fused rwin_attention supports {DTYPES}; got qkv {qkv.dtype}, "
                        f"bias_table {bias_table.dtype}")
    if bias_table.device != qkv.device:
        raise ValueError(f"qkv is on {qkv.device} but bias_table on {bias_table.device}")
    s0, s1 = (int(s) for s in split)
    if min(s0, s1) < 1 or max(s0, s1) % min(s0, s1) != 0:
        raise ValueError(f"split {tuple(split)}: windows must tile the map padded to a multiple of "
                         "max(split), so max(split) must be a multiple of min(split)")
    if s0 * s1 > MAX_WINDOW:
        raise ValueError(f"split {tuple(split)}: windows of {s0 * s1} tokens exceed the kernel's "
                         f"{MAX_WINDOW}")
    hb = heads // 2
    if hb < 1 or (C // 2) % hb != 0:
        raise ValueError(f"heads={heads}: each branch needs heads // 2 >= 1 heads dividing C/2 = {C // 2}")
    D = C // 2 // hb
    if D > MAX_HEAD_DIM:
        raise ValueError(f"head dim {D} exceeds the kernel's {MAX_HEAD_DIM}")
    M = (2 * s0 - 1) * (2 * s1 - 1)
    if tuple(bias_table.shape) != (2, M, hb):
        raise ValueError(f"bias_table must be (2, {M}, {hb}) for split {tuple(split)} and {heads} heads, "
                         f"got {tuple(bias_table.shape)}")
    if 2 * B > 65535:
        raise ValueError(f"batch {B} exceeds the kernel grid's limit of 32767 images")
    p = max(s0, s1)
    return Geometry(B, H, W, C, hb, D, s0, s1, H + (-H) % p, W + (-W) % p)


def rwin_attn_fwd(qkv: Tensor, bias_table: Tensor, H: int, W: int, split: tuple[int, int], shift: bool,
                  heads: int, scale: float, *, block: Block = None) -> tuple[Tensor, Tensor]:
    """Fused L-SA attention of both branches, with the semantics of `rgt.ops.reference.rwin_attention`.

    Args:
        qkv: (B, H*W, 3C), any strides. bias_table: (2, M, heads // 2), M = (2*s0-1)(2*s1-1).
    Returns:
        out: (B, H*W, C) contiguous, qkv's dtype. lse: (B, 2, heads // 2, H*W) fp32, kept for the backward.

    Performance:
        block: query and key tile (powers of two >= 16): one size for both or (queries, keys); default
            CONFIGS' on a GPU, the whole window interpreted.
    """
    g = check_inputs(qkv, bias_table, H, W, split, heads)
    out = qkv.new_empty((g.B, H * W, g.C))
    lse = qkv.new_empty((g.B, 2, g.hb, H * W), dtype=torch.float32)
    if g.B == 0:
        return out, lse
    cfg = g.config("fwd", qkv.dtype, block)
    launch(_rwin_attn_fwd_kernel)[(g.n_win * triton.cdiv(g.N, cfg.block_m), g.hb, 2 * g.B)](
        qkv, bias_table, out, lse, *qkv.stride(), *bias_table.stride(), out.stride(0), out.stride(1),
        *g.args(scale), **cfg.kwargs(), **g.constexprs(shift, qkv.dtype),
    )
    return out, lse


def rwin_attn_bwd(dout: Tensor, qkv: Tensor, bias_table: Tensor, out: Tensor, lse: Tensor, H: int, W: int,
                  split: tuple[int, int], shift: bool, heads: int, scale: float, *, block: Block = None,
                  windows_per_program: int | None = None) -> tuple[Tensor, Tensor]:
    """Gradients of `rwin_attn_fwd`: dqkv (B, H*W, 3C) in qkv's dtype and dbias (2, M, hb) in bias_table's.

    Args:
        dout: (B, H*W, C), any strides. out, lse: the forward's outputs.

    Performance:
        block: query and key tiles of every kernel, as in `rwin_attn_fwd`.
        windows_per_program: windows each d(bias) program loops over (default: ~512 programs on a GPU).
            Fewer windows per program means more (N, N) fp32 partials of the bias gradient to write and sum.
    """
    g = check_inputs(qkv, bias_table, H, W, split, heads)
    dout = dout.to(qkv.dtype)
    dqkv = qkv.new_empty((g.B, H * W, 3 * g.C))
    n_total = g.B * g.n_win
    cfg = {name: g.config(name, qkv.dtype, block) for name in ("dkdv", "dq", "dbias")}
    bias_tiles = triton.cdiv(g.N, cfg["dbias"].block_m) * triton.cdiv(g.N, cfg["dbias"].block_n)
    per_chunk = windows_per_program
    if per_chunk is None:  # ~512 programs on a GPU; 2 chunks interpreted, where each program costs ~0.1 s
        chunks = 2 if INTERPRET else 512 // (bias_tiles * 2 * g.hb)
        per_chunk = triton.cdiv(n_total, max(1, min(n_total, chunks)))
    per_chunk = max(1, per_chunk)
    partials = qkv.new_empty((triton.cdiv(n_total, per_chunk), 2, g.hb, g.N, g.N), dtype=torch.float32)
    if n_total > 0:
        delta = torch.empty_like(lse)
        _delta(g, out, dout, delta)
        ins = (qkv, bias_table, dout, lse, delta)
        strides = (*qkv.stride(), *bias_table.stride(), *dout.stride())
        consts = g.constexprs(shift, qkv.dtype)
        for name, kernel in (("dkdv", _rwin_attn_bwd_dkdv_kernel), ("dq", _rwin_attn_bwd_dq_kernel)):
            tiles = triton.cdiv(g.N, cfg[name].block_n if name == "dkdv" else cfg[name].block_m)
            launch(kernel)[(g.n_win * tiles, g.hb, 2 * g.B)](
                *ins, dqkv, *strides, dqkv.stride(0), dqkv.stride(1), *g.args(scale), **cfg[name].kwargs(),
                **consts,
            )
        launch(_rwin_attn_bwd_dbias_kernel)[(bias_tiles, g.hb, 2 * partials.shape[0])](
            *ins, partials, *strides, *g.args(scale), g.n_win, n_total, per_chunk, **cfg["dbias"].kwargs(),
            **consts,
        )
    dbias = fold_bias_grad(partials.sum(0), g.s0, g.s1)  # chunks summed in a fixed order: deterministic
    return dqkv, dbias.to(bias_table.dtype)


def _delta(g: Geometry, out: Tensor, dout: Tensor, delta: Tensor) -> None:
    """delta (B, 2, hb, H*W) fp32 <- per-head row sums of dout * out."""
    block_l = 1024 if INTERPRET else 64
    launch(_rwin_attn_bwd_delta_kernel)[(triton.cdiv(g.H * g.W, block_l), 2 * g.hb, g.B)](
        out, dout, delta, out.stride(0), out.stride(1), *dout.stride(), g.H * g.W, g.hb, g.D,
        BLOCK_L=block_l, BLOCK_D=max(16, triton.next_power_of_2(g.D)), num_warps=4,
    )


def fold_bias_grad(grad_scores: Tensor, s0: int, s1: int) -> Tensor:
    """(2, hb, N, N) gradient of the per-window bias matrices -> (2, M, hb) gradient of the table.

    Table row of (i, j) is (r_i - r_j + hs - 1) * (2ws - 1) + (c_i - c_j + ws - 1): sums along the diagonals
    of the (r_i, r_j) and (c_i, c_j) planes, done with pads and views (index_add on CUDA uses atomics).
    """
    hb = grad_scores.shape[1]
    tables = []
    for br, (hs, ws) in enumerate(((s0, s1), (s1, s0))):
        x = grad_scores[br].view(hb, hs, ws, hs, ws).permute(0, 2, 4, 1, 3)  # (hb, c_i, c_j, r_i, r_j)
        x = _diagonal_sums(x).permute(0, 3, 1, 2)  # (hb, 2hs-1, c_i, c_j)
        x = _diagonal_sums(x)  # (hb, 2hs-1, 2ws-1)
        tables.append(x.reshape(hb, -1).t())
    return torch.stack(tables)


def _diagonal_sums(x: Tensor) -> Tensor:
    """(..., n, n) -> (..., 2n-1): out[..., i - j + n - 1] = sum of x[..., i, j] over that diagonal."""
    n = x.shape[-1]
    lead = x.shape[:-2]
    y = torch.nn.functional.pad(x.flip(-1), (0, n))  # (..., n, 2n): y[i, j'] = x[i, n-1-j'], then zeros
    # Rows of y re-read with length 2n-1 shift row i right by i: entry (i, k) is x[i, j], k = i - j + n - 1.
    y = y.reshape(*lead, 2 * n * n)[..., : n * (2 * n - 1)].reshape(*lead, n, 2 * n - 1)
    return y.sum(-2)
