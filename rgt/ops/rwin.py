"""`rwin_attention`: L-SA rectangle-window attention (both branches, padding, shift, masks, bias) in one op.

Fused path: the Triton kernels of `rgt.kernels.rwin_attn` behind two ops, `rgt::rwin_attn_fwd` -> (out, lse)
and `rgt::rwin_attn_bwd` -> (dqkv, dbias), joined by `register_autograd`.
"""

from __future__ import annotations

import importlib

import torch
from torch import Tensor

from rgt.ops import portable, reference
from rgt.ops._dispatch import TRITON_OPS, Op, default_mode, triton_unavailable

# Without Triton (e.g. macOS) or torch < 2.6 only the reference exists; triton_unavailable then says why.
_kernels = importlib.import_module("rgt.kernels.rwin_attn") if TRITON_OPS else None


def _fwd(qkv: Tensor, bias_table: Tensor, H: int, W: int, s0: int, s1: int, shift: bool, heads: int,
         scale: float) -> tuple[Tensor, Tensor]:
    return _kernels.rwin_attn_fwd(qkv, bias_table, H, W, (s0, s1), shift, heads, scale)


def _fwd_fake(qkv: Tensor, bias_table: Tensor, H: int, W: int, s0: int, s1: int, shift: bool, heads: int,
              scale: float) -> tuple[Tensor, Tensor]:
    B, L, C3 = qkv.shape
    return qkv.new_empty((B, L, C3 // 3)), qkv.new_empty((B, 2, heads // 2, L), dtype=torch.float32)


def _bwd(dout: Tensor, qkv: Tensor, bias_table: Tensor, out: Tensor, lse: Tensor, H: int, W: int, s0: int,
         s1: int, shift: bool, heads: int, scale: float) -> tuple[Tensor, Tensor]:
    return _kernels.rwin_attn_bwd(dout, qkv, bias_table, out, lse, H, W, (s0, s1), shift, heads, scale)


def _bwd_fake(dout: Tensor, qkv: Tensor, bias_table: Tensor, out: Tensor, lse: Tensor, H: int, W: int,
              s0: int, s1: int, shift: bool, heads: int, scale: float) -> tuple[Tensor, Tensor]:
    return qkv.new_empty(qkv.shape), bias_table.new_empty(bias_table.shape)


def _setup_context(ctx, inputs, output) -> None:
    qkv, bias_table, *geometry = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(qkv, bias_table, out, lse)
    ctx.geometry = geometry  # H, W, s0, s1, shift, heads, scale


def _backward(ctx, dout: Tensor, _dlse: Tensor | None):
    qkv, bias_table, out, lse = ctx.saved_tensors
    dqkv, dbias = torch.ops.rgt.rwin_attn_bwd(dout, qkv, bias_table, out, lse, *ctx.geometry)
    return (dqkv, dbias) + (None,) * len(ctx.geometry)


def _no_double_backward(ctx, *grads):
    raise RuntimeError("rgt::rwin_attn_fwd has no double backward (its fused backward is not differentiable);"
                       " use kernels='reference' for higher-order gradients")


def _register() -> None:
    """Define rgt::rwin_attn_fwd / _bwd: triton_ops on a GPU, custom_ops with these fakes when interpreted."""
    from rgt.kernels._common import triton_op

    triton_op("rgt::rwin_attn_fwd", fake=_fwd_fake)(_fwd)
    triton_op("rgt::rwin_attn_bwd", fake=_bwd_fake)(_bwd)
    torch.library.register_autograd("rgt::rwin_attn_fwd", _backward, setup_context=_setup_context)
    torch.library.register_autograd("rgt::rwin_attn_bwd", _no_double_backward)


if _kernels is not None:
    _register()


def _fused(qkv: Tensor, bias_table: Tensor, H: int, W: int, split: tuple[int, int], shift: bool, heads: int,
           scale: float) -> Tensor:
    s0, s1 = split
    return torch.ops.rgt.rwin_attn_fwd(qkv, bias_table, H, W, int(s0), int(s1), bool(shift), heads,
                                       float(scale))[0]


def _unavailable(x: Tensor) -> str | None:
    """Why the Triton op cannot run on x (no GPU / Triton, or a dtype the kernel lacks), or None."""
    reason = triton_unavailable(x)
    if reason is None and x.dtype not in _kernels.DTYPES:
        return f"the Triton kernel supports {_kernels.DTYPES}, not {x.dtype}"
    return reason


OP = Op("rwin_attention", reference.rwin_attention, _fused, _unavailable, portable.rwin_attention)


def rwin_attention(qkv: Tensor, bias_table: Tensor, H: int, W: int, split: tuple[int, int], shift: bool,
                   heads: int, scale: float, *, kernels: str | None = None) -> Tensor:
    """Rectangle-window attention of L-SA; see `rgt.ops.reference.rwin_attention` for the exact semantics.

    Args:
        qkv: (B, H*W, 3C) projection output. bias_table: (2, M, heads // 2), M = (2*s0-1)(2*s1-1).
        kernels: "auto" (fused where it can run, else portable), "fused", "reference" or "portable"
            (`rgt.ops.portable`: SDPA over chunks of window rows); default RGT_KERNELS.
    Returns:
        (B, H*W, C), channels [branch 0 (s0 x s1 windows) | branch 1 (s1 x s0 windows)].
    """
    return OP.select(kernels or default_mode(), qkv)(qkv, bias_table, H, W, split, shift, heads, scale)
