"""Fused RG-SA cross-attention, forward and backward, in Triton.

Paper: Chen et al., "Recursive Generalization Transformer for Image Super-Resolution", ICLR 2024. RG-SA
attends all N = H*W tokens to N' representative tokens: out = softmax(q k^T * scale) v, with q, k of head dim
dqk = C*c_ratio/heads (15 in RGT) and v of head dim dv = C/heads (30).

Changes from the FlashAttention-2 scheme (flash-style online softmax, log-sum-exp saved for backward):
- dqk != dv, and any head dims up to 64: tiles are padded to powers of two >= 16 inside the kernel with masked
  loads, never by padded copies on the host.
- N' is small (16 in training, 256 for a 256x256 LR image, a few thousand for a whole image), N huge (up to
  ~750k): when a head's K/V fit one tile (N' <= 256) a forward program loads them once and streams several
  query tiles past them; otherwise K/V are streamed in blocks per query tile.
- Backward is deterministic, without atomics: programs own (key block, range of query tiles) and write fp32
  partial dk/dv, summed over the ranges by one torch reduction afterwards (N'*d floats per range). With all
  keys in one block (N' <= 256) the same program also computes dq and delta = rowsum(dO*O), so P is computed
  once; otherwise a separate dq kernel (which also writes delta) runs first.
- Any strides for q, k, v and dO (the model passes permuted views of Linear outputs). out, dq, dk, dv are
  allocated token-major, (B, N, heads, d) memory returned as (B, heads, N, d) views, so merging heads after
  the op is free. Base and row offsets are int64.

Limits: dqk, dv <= 64; N' >= 1; B*heads <= 65535 (CUDA grid); fp32/fp16/bf16 inputs of one dtype, fp32
accumulation; fp32 dots use IEEE precision (no TF32) so fp32 matches the reference to ~1e-6. Block sizes are
one config per shape class and precision, chosen so that the sm_90 compiler keeps every variant the model
launches free of register spills (FWD_CONFIGS, BWD_CONFIGS); not yet timed on hardware.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import launch

MAX_HEAD_DIM = 64
RESIDENT_KV = 256  # N' up to this: one key block, K/V stay on chip (forward), dq fused into the dk/dv pass
# Programs to aim for (H100/H200: 132 SMs): forward packs query tiles per program down to about this many,
# backward splits the query axis up to about this many. Tests lower them to exercise the loops.
TARGET_PROGRAMS = {"fwd": 1024, "bwd": 512}
_LOG2E = math.log2(math.e)
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _load(ptr, rows, n_rows, stride_r, cols, n_cols, stride_c, other):
    """Masked (len(rows), len(cols)) tile; offsets in int64 (N * stride can pass 2^31)."""
    offs = rows.to(tl.int64)[:, None] * stride_r + cols[None, :] * stride_c
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    return tl.load(ptr + offs, mask=mask, other=other)


@triton.jit
def _store(ptr, val, rows, n_rows, stride_r, cols, n_cols, stride_c):
    offs = rows.to(tl.int64)[:, None] * stride_r + cols[None, :] * stride_c
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    tl.store(ptr + offs, val.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _fwd_step(q, kt, v, kvalid, m_i, l_i, acc, qk_scale, DOT_PREC: tl.constexpr):
    """One key block of the online softmax, in base 2: s = q k^T * scale * log2(e)."""
    s = tl.dot(q, kt, input_precision=DOT_PREC) * qk_scale
    s = tl.where(kvalid[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
    return m_new, l_i, acc


@triton.jit
def _rgsa_attn_fwd_kernel(
    Q, K, V, Out, Lse,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    heads, n_q, n_kv, dqk, dv, tiles_per_prog, qk_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DQK: tl.constexpr, DV: tl.constexpr,
    KV_RESIDENT: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """Program (i, b*heads + h): query tiles [i*tiles_per_prog, (i+1)*tiles_per_prog) of head (b, h).

    Writes out = softmax(q k^T * scale) v and, per row, lse = log2(sum_j 2^(q.k_j * scale * log2(e))), the
    log-sum-exp in base 2 (fp32): the backward subtracts it from base-2 logits with no conversion rounding.
    KV_RESIDENT (N' <= BLOCK_N): K^T and V are loaded once per program, before the query loop.
    """
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // heads, bh % heads
    Q += b * stride_qb + h * stride_qh
    K += b * stride_kb + h * stride_kh
    V += b * stride_vb + h * stride_vh
    Out += b * stride_ob + h * stride_oh
    Lse += bh * n_q
    cq, cv, kn = tl.arange(0, DQK), tl.arange(0, DV), tl.arange(0, BLOCK_N)
    if KV_RESIDENT:
        kt = _load(K, cq, dqk, stride_kd, kn, n_kv, stride_kn, 0.0)  # (DQK, BLOCK_N)
        v = _load(V, kn, n_kv, stride_vn, cv, dv, stride_vd, 0.0)  # (BLOCK_N, DV)
    for t in range(tiles_per_prog):
        rows = (pid_m * tiles_per_prog + t) * BLOCK_M + tl.arange(0, BLOCK_M)
        q = _load(Q, rows, n_q, stride_qm, cq, dqk, stride_qd, 0.0)  # (BLOCK_M, DQK)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, DV], tl.float32)
        if KV_RESIDENT:
            m_i, l_i, acc = _fwd_step(q, kt, v, kn < n_kv, m_i, l_i, acc, qk_scale, DOT_PREC)
        else:
            for start in range(0, n_kv, BLOCK_N):
                kb = start + kn
                kt = _load(K, cq, dqk, stride_kd, kb, n_kv, stride_kn, 0.0)
                v = _load(V, kb, n_kv, stride_vn, cv, dv, stride_vd, 0.0)
                m_i, l_i, acc = _fwd_step(q, kt, v, kb < n_kv, m_i, l_i, acc, qk_scale, DOT_PREC)
        _store(Out, acc / l_i[:, None], rows, n_q, stride_om, cv, dv, stride_od)
        tl.store(Lse + rows, m_i + tl.log2(l_i), mask=rows < n_q)


@triton.jit
def _rgsa_attn_bwd_dq_kernel(
    Q, K, V, Out, DO, Lse, Delta, DQ,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    heads, n_q, n_kv, dqk, dv, qk_scale, scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DQK: tl.constexpr, DV: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """Program (i, b*heads + h), used when N' spans several key blocks: query tile i of head (b, h).

    delta = rowsum(dO * O) (written for the dk/dv kernel); dq = scale * sum_j P_ij (dP_ij - delta_i) k_j,
    P recomputed from the saved lse, streaming K/V blocks.
    """
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // heads, bh % heads
    Q += b * stride_qb + h * stride_qh
    K += b * stride_kb + h * stride_kh
    V += b * stride_vb + h * stride_vh
    Out += b * stride_ob + h * stride_oh
    DO += b * stride_dob + h * stride_doh
    DQ += b * stride_dqb + h * stride_dqh
    Lse += bh * n_q
    Delta += bh * n_q
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cq, cv, kn = tl.arange(0, DQK), tl.arange(0, DV), tl.arange(0, BLOCK_N)
    q = _load(Q, rows, n_q, stride_qm, cq, dqk, stride_qd, 0.0)
    do = _load(DO, rows, n_q, stride_dom, cv, dv, stride_dod, 0.0)
    o = _load(Out, rows, n_q, stride_om, cv, dv, stride_od, 0.0)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    tl.store(Delta + rows, delta, mask=rows < n_q)
    lse2 = tl.load(Lse + rows, mask=rows < n_q, other=0.0)
    dq = tl.zeros([BLOCK_M, DQK], tl.float32)
    for start in range(0, n_kv, BLOCK_N):
        kb = start + kn
        kt = _load(K, cq, dqk, stride_kd, kb, n_kv, stride_kn, 0.0)  # (DQK, BLOCK_N)
        vt = _load(V, cv, dv, stride_vd, kb, n_kv, stride_vn, 0.0)  # (DV, BLOCK_N)
        s = tl.dot(q, kt, input_precision=DOT_PREC) * qk_scale
        p = tl.exp2(tl.where((kb < n_kv)[None, :], s, float("-inf")) - lse2[:, None])
        dp = tl.dot(do, vt, input_precision=DOT_PREC)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(q.dtype), tl.trans(kt), dq, input_precision=DOT_PREC)
    _store(DQ, dq * scale, rows, n_q, stride_dqm, cq, dqk, stride_dqd)


@triton.jit
def _rgsa_attn_bwd_kernel(
    Q, K, V, Out, DO, Lse, Delta, DQ, DKp, DVp,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    stride_dks, stride_dkb, stride_dkh, stride_dkn,
    stride_dvs, stride_dvb, stride_dvh, stride_dvn,
    heads, n_q, n_kv, dqk, dv, tiles_per_split, qk_scale, scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DQK: tl.constexpr, DV: tl.constexpr,
    FUSE_DQ: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """Program (j, s, b*heads + h): key block j of head (b, h) against query tiles
    [s*tiles_per_split, (s+1)*tiles_per_split).

    Computed transposed (keys x queries) so the dk/dv accumulations are plain dots:
    P^T = exp(k q^T * scale - lse), dv_j = sum_i P_ij dO_i, dS^T = P^T (v dO^T - delta), dk_j = scale *
    sum_i dS_ij q_i. Writes fp32 partial dk, dv of range s to DKp[s], DVp[s] (summed by the launcher: fixed
    order, deterministic). FUSE_DQ (one key block holds all of N'): also delta = rowsum(dO * O) and
    dq_i = scale * sum_j dS_ij k_j, complete in this program; otherwise delta comes from the dq kernel.
    """
    pid_s = tl.program_id(1)
    bh = tl.program_id(2).to(tl.int64)
    b, h = bh // heads, bh % heads
    Q += b * stride_qb + h * stride_qh
    K += b * stride_kb + h * stride_kh
    V += b * stride_vb + h * stride_vh
    Out += b * stride_ob + h * stride_oh
    DO += b * stride_dob + h * stride_doh
    DQ += b * stride_dqb + h * stride_dqh
    DKp += pid_s.to(tl.int64) * stride_dks + b * stride_dkb + h * stride_dkh
    DVp += pid_s.to(tl.int64) * stride_dvs + b * stride_dvb + h * stride_dvh
    Lse += bh * n_q
    Delta += bh * n_q
    cq, cv, mm = tl.arange(0, DQK), tl.arange(0, DV), tl.arange(0, BLOCK_M)
    kb = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k = _load(K, kb, n_kv, stride_kn, cq, dqk, stride_kd, 0.0)  # (BLOCK_N, DQK)
    v = _load(V, kb, n_kv, stride_vn, cv, dv, stride_vd, 0.0)  # (BLOCK_N, DV)
    dk = tl.zeros([BLOCK_N, DQK], tl.float32)
    dv_acc = tl.zeros([BLOCK_N, DV], tl.float32)
    for t in range(tiles_per_split):
        rows = (pid_s * tiles_per_split + t) * BLOCK_M + mm
        q = _load(Q, rows, n_q, stride_qm, cq, dqk, stride_qd, 0.0)  # (BLOCK_M, DQK)
        do = _load(DO, rows, n_q, stride_dom, cv, dv, stride_dod, 0.0)  # (BLOCK_M, DV)
        if FUSE_DQ:
            o = _load(Out, rows, n_q, stride_om, cv, dv, stride_od, 0.0)
            delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
        else:
            delta = tl.load(Delta + rows, mask=rows < n_q, other=0.0)
        # lse = +inf on rows past N gives P = 0 there; masking padded keys keeps exp2 finite (no inf * 0).
        lse2 = tl.load(Lse + rows, mask=rows < n_q, other=float("inf"))
        st = tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * qk_scale  # (BLOCK_N, BLOCK_M)
        pt = tl.exp2(tl.where((kb < n_kv)[:, None], st, float("-inf")) - lse2[None, :])
        dv_acc = tl.dot(pt.to(do.dtype), do, dv_acc, input_precision=DOT_PREC)
        dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
        dst = pt * (dpt - delta[None, :])
        dk = tl.dot(dst.to(q.dtype), q, dk, input_precision=DOT_PREC)
        if FUSE_DQ:
            dq = tl.dot(tl.trans(dst.to(k.dtype)), k, input_precision=DOT_PREC)
            _store(DQ, dq * scale, rows, n_q, stride_dqm, cq, dqk, stride_dqd)
    _store(DKp, dk * scale, kb, n_kv, stride_dkn, cq, dqk, 1)
    _store(DVp, dv_acc, kb, n_kv, stride_dvn, cv, dv, 1)


def _check(q: Tensor, k: Tensor, v: Tensor) -> None:
    """Shapes, dtypes and devices the kernels accept; errors name the offending sizes."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"rgsa_attention: q, k, v must be 4-D (B, heads, N, d); got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    B, H, _, dqk = q.shape
    if k.shape[:2] != (B, H) or v.shape[:2] != (B, H) or k.shape[3] != dqk or v.shape[2] != k.shape[2]:
        raise ValueError(f"rgsa_attention: expected q (B, h, N, dqk), k (B, h, N', dqk), v (B, h, N', dv); "
                         f"got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape[2] < 1:
        raise ValueError("rgsa_attention: needs at least one key (N' >= 1); got N' = 0")
    if dqk > MAX_HEAD_DIM or v.shape[3] > MAX_HEAD_DIM:
        raise ValueError(f"rgsa_attention: the fused kernel supports head dims up to {MAX_HEAD_DIM}; "
                         f"got dqk = {dqk}, dv = {v.shape[3]}")
    if q.dtype not in _DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"rgsa_attention: q, k, v must share one dtype of {_DTYPES}; "
                        f"got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"rgsa_attention: q, k, v must be on one device; "
                         f"got {q.device}, {k.device}, {v.device}")
    if B * H > 65535:
        raise ValueError(f"rgsa_attention: B * heads = {B * H} exceeds the CUDA grid limit 65535")


def _token_major(B: int, H: int, n: int, d: int, like: Tensor) -> Tensor:
    """Uninitialised (B, H, n, d) view of (B, n, H, d) memory: merging heads afterwards is a free view."""
    return like.new_empty((B, n, H, d)).permute(0, 2, 1, 3)


def alloc_fwd(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """Outputs of `rgsa_attn_fwd`: out (B, h, N, dv) token-major and lse (B, h, N) fp32 contiguous."""
    _check(q, k, v)
    B, H, N, _ = q.shape
    return _token_major(B, H, N, v.shape[3], q), q.new_empty((B, H, N), dtype=torch.float32)


def alloc_bwd(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Outputs of `rgsa_attn_bwd`: dq, dk, dv shaped like q, k, v, token-major."""
    _check(q, k, v)
    B, H, N, dqk = q.shape
    n_kv = k.shape[2]
    dv = v.shape[3]
    return _token_major(B, H, N, dqk, q), _token_major(B, H, n_kv, dqk, k), _token_major(B, H, n_kv, dv, v)


def _tile(n) -> int:
    """Power of two >= 16 (the tl.dot minimum) covering n. int() specialises a symbolic size under
    torch.compile: tile sizes are compile-time constants anyway."""
    return max(16, triton.next_power_of_2(int(n)))


def _dims(q: Tensor, v: Tensor) -> dict:
    """Padded head dims and the dot precision (IEEE for fp32: TF32 would cost ~1e-3 relative)."""
    return {
        "DQK": _tile(q.shape[3]),
        "DV": _tile(v.shape[3]),
        "DOT_PREC": "ieee" if q.dtype == torch.float32 else "tf32",
    }


# Tiles per shape class and precision: the first entry is used, the others are alternatives to autotune over
# on a GPU. Classes by N' (keys): up to 16 (training crops), 64 and RESIDENT_KV keep all keys in one tile
# (BLOCK_N None: N' padded to a power of two); "streamed" walks key blocks, and is also where a class without
# an entry for its precision goes. Entries are (BLOCK_M, BLOCK_N, num_warps, num_stages), chosen from the sm_90
# compiler's verdict: the first entries compile without register spills for every launch of the model
# (`python bench/sm90.py` on Triton 3.6, 3.8 and 3.9; tests/test_sm90.py gates them), the 64-key class and the
# alternatives did so on Triton 3.9 at one shape each (a sweep, 2026-11-30). IEEE fp32 dots run on CUDA cores
# with their operands in registers, hence smaller fp32 tiles: the fp32 backward keeps all keys in one block
# only up to 16 (32 keys spilled 96 B/thread, 64 keys 0.8 KB, 256 keys 2 KB at every query tile) and streams
# 32-key blocks beyond, on 8 warps and one pipelining stage (two stages spilled 8 B on Triton 3.8; 4 warps:
# 255 registers and 28 B of spills on Triton 3.9); the fp32 forward takes 32-row query tiles past 64 keys
# (64 rows spilled 1.3 KB at 256 keys).
FWD_CONFIGS = {
    (16, "fp16/bf16"): [(128, None, 4, 2)],
    (16, "fp32"): [(128, None, 4, 2)],
    (64, "fp16/bf16"): [(128, None, 4, 2)],
    (64, "fp32"): [(128, None, 4, 2)],
    (RESIDENT_KV, "fp16/bf16"): [(64, None, 8, 2)],
    (RESIDENT_KV, "fp32"): [(32, None, 8, 2), (16, None, 4, 2)],
    ("streamed", "fp16/bf16"): [(128, 64, 4, 2)],
    ("streamed", "fp32"): [(64, 64, 4, 2), (128, 64, 4, 2)],
}
BWD_CONFIGS = {
    (16, "fp16/bf16"): [(32, None, 4, 2), (32, None, 4, 1), (16, None, 4, 2), (64, None, 4, 1)],
    (16, "fp32"): [(32, None, 4, 2), (32, None, 4, 1), (16, None, 4, 2)],
    (64, "fp16/bf16"): [(32, None, 4, 2)],
    (RESIDENT_KV, "fp16/bf16"): [(32, None, 8, 2), (16, None, 8, 2)],
    ("streamed", "fp16/bf16"): [(64, 64, 4, 2), (32, 64, 4, 2)],
    ("streamed", "fp32"): [(32, 32, 8, 1), (32, 32, 4, 1), (16, 32, 8, 2)],
}


def _shape_class(n_kv: int, configs: dict, precision: str) -> int | str:
    """The smallest resident class holding N' keys that has configs for this precision, else "streamed"."""
    for cls in (16, 64, RESIDENT_KV):
        if n_kv <= cls and (cls, precision) in configs:
            return cls
    return "streamed"


def _precision(dtype: torch.dtype) -> str:
    return "fp32" if dtype == torch.float32 else "fp16/bf16"


def _fwd_config(N: int, n_kv: int, BH: int, dtype: torch.dtype) -> dict:
    """The class's first config; resident programs take several query tiles each so that about
    TARGET_PROGRAMS["fwd"] programs remain."""
    cls = _shape_class(n_kv, FWD_CONFIGS, _precision(dtype))
    block_m, block_n, warps, stages = FWD_CONFIGS[cls, _precision(dtype)][0]
    resident = cls != "streamed"
    block_n = _tile(n_kv) if resident else block_n
    n_tiles = triton.cdiv(N, block_m)
    tiles = min(16, max(1, n_tiles * BH // TARGET_PROGRAMS["fwd"])) if resident else 1
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "KV_RESIDENT": resident, "tiles": tiles,
            "num_warps": warps, "num_stages": stages}


def _bwd_config(N: int, n_kv: int, BH: int, dtype: torch.dtype) -> dict:
    """The class's first config, and the split of the query axis into about TARGET_PROGRAMS["bwd"] dk/dv
    programs. All keys in one block (not "streamed") fuses dq into the dk/dv kernel."""
    cls = _shape_class(n_kv, BWD_CONFIGS, _precision(dtype))
    block_m, block_n, warps, stages = BWD_CONFIGS[cls, _precision(dtype)][0]
    fuse = cls != "streamed"
    block_n = _tile(n_kv) if fuse else block_n
    n_tiles = max(1, triton.cdiv(N, block_m))
    splits = min(n_tiles, triton.cdiv(TARGET_PROGRAMS["bwd"], triton.cdiv(n_kv, block_n) * max(1, BH)))
    per_split = triton.cdiv(n_tiles, splits)
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "FUSE_DQ": fuse, "n_tiles": n_tiles,
            "splits": triton.cdiv(n_tiles, per_split), "per_split": per_split,
            "num_warps": warps, "num_stages": stages}


def rgsa_attn_fwd(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """softmax(q k^T * scale) v and its log-sum-exp.

    Args:
        q: (B, h, N, dqk), k: (B, h, N', dqk), v: (B, h, N', dv); any strides, one dtype.
    Returns:
        out (B, h, N, dv) in q's dtype, a view of (B, N, h, dv) memory; lse (B, h, N) fp32, in base 2
        (log2 of the row sum of 2^(q k^T * scale * log2(e)), i.e. the natural log-sum-exp times log2(e)).
    """
    out, lse = alloc_fwd(q, k, v)
    B, H, N, dqk = q.shape
    if out.numel() == 0:
        return out, lse
    cfg = _fwd_config(N, k.shape[2], B * H, q.dtype)
    grid = (triton.cdiv(triton.cdiv(N, cfg["BLOCK_M"]), cfg["tiles"]), B * H)
    launch(_rgsa_attn_fwd_kernel)[grid](
        q, k, v, out, lse, *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        H, N, k.shape[2], dqk, v.shape[3], cfg["tiles"], scale * _LOG2E,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], KV_RESIDENT=cfg["KV_RESIDENT"], **_dims(q, v),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return out, lse


def rgsa_attn_bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                  scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of `rgsa_attn_fwd` from the saved out and lse (the N x N' matrix is recomputed per tile).

    Args:
        do, out: (B, h, N, dv), any strides. lse: (B, h, N) fp32 from the forward.
    Returns:
        dq, dk, dv shaped like q, k, v (token-major views), in the input dtype.
    """
    _check(q, k, v)
    B, H, N, dqk = q.shape
    n_kv, d_v = v.shape[2], v.shape[3]
    if do.shape != out.shape or out.shape != (B, H, N, d_v) or lse.shape != (B, H, N):
        raise ValueError(f"rgsa_attn_bwd: expected dO and out {(B, H, N, d_v)} and lse {(B, H, N)}; got "
                         f"{tuple(do.shape)}, {tuple(out.shape)}, {tuple(lse.shape)}")
    cfg = _bwd_config(N, n_kv, B * H, q.dtype)
    dq = _token_major(B, H, N, dqk, q)
    dk_ws = q.new_empty((cfg["splits"], B, n_kv, H, dqk), dtype=torch.float32)  # fp32 partials per range
    dv_ws = q.new_empty((cfg["splits"], B, n_kv, H, d_v), dtype=torch.float32)
    if q.numel() == 0:
        dk_ws.zero_(), dv_ws.zero_()
    else:
        _launch_bwd(cfg, do, q, k, v, out, lse.float().contiguous(), scale, dq, dk_ws, dv_ws)
    # (splits, B, N', h, d) -> (B, N', h, d) in a fixed order -> (B, h, N', d) view, like alloc_bwd's layout.
    dk = dk_ws.sum(0).to(k.dtype).permute(0, 2, 1, 3)
    dv = dv_ws.sum(0).to(v.dtype).permute(0, 2, 1, 3)
    return dq, dk, dv


def _launch_bwd(cfg: dict, do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                scale: float, dq: Tensor, dk_ws: Tensor, dv_ws: Tensor) -> None:
    """dq kernel (only when N' spans several key blocks), then the dk/dv (+ fused dq) kernel."""
    B, H, N, dqk = q.shape
    n_kv, d_v = v.shape[2], v.shape[3]
    common = dict(BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], num_warps=cfg["num_warps"],
                  num_stages=cfg["num_stages"], **_dims(q, v))
    strides = (*q.stride(), *k.stride(), *v.stride(), *out.stride(), *do.stride(), *dq.stride())
    delta = lse  # unused when FUSE_DQ: the dk/dv kernel computes delta itself
    if not cfg["FUSE_DQ"]:
        delta = torch.empty_like(lse)
        launch(_rgsa_attn_bwd_dq_kernel)[(cfg["n_tiles"], B * H)](
            q, k, v, out, do, lse, delta, dq, *strides, H, N, n_kv, dqk, d_v, scale * _LOG2E, scale, **common,
        )
    ws_strides = [w.stride(i) for w in (dk_ws, dv_ws) for i in (0, 1, 3, 2)]  # (split, b, h, key)
    launch(_rgsa_attn_bwd_kernel)[(triton.cdiv(n_kv, cfg["BLOCK_N"]), cfg["splits"], B * H)](
        q, k, v, out, do, lse, delta, dq, dk_ws, dv_ws, *strides, *ws_strides,
        H, N, n_kv, dqk, d_v, cfg["per_split"], scale * _LOG2E, scale, FUSE_DQ=cfg["FUSE_DQ"], **common,
    )
