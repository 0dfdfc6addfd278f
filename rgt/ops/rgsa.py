"""`rgsa_attention`: RG-SA cross-attention of all tokens against the small representative map.

Fused path: the flash-style Triton kernels of `rgt.kernels.rg_attn`, exposed as the custom ops
`rgt::rgsa_attn_fwd` (out, lse) and `rgt::rgsa_attn_bwd` (dq, dk, dv) with fakes and autograd, so
torch.compile traces the model and training uses them. The N x N' attention matrix is never stored.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rgt.ops import portable, reference
from rgt.ops._dispatch import TRITON_OPS, Op, default_mode, triton_unavailable


def _fused(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    return torch.ops.rgt.rgsa_attn_fwd(q, k, v, float(scale))[0]


OP = Op("rgsa_attention", reference.rgsa_attention, _fused, triton_unavailable, portable.rgsa_attention)


def rgsa_attention(q: Tensor, k: Tensor, v: Tensor, scale: float, *, kernels: str | None = None) -> Tensor:
    """softmax(q k^T * scale) v.

    Args:
        q: (B, heads, N, dqk). k: (B, heads, N', dqk). v: (B, heads, N', dv). Any strides (e.g. permuted
            views of (B, N, heads*d) projections); the fused path needs dqk, dv <= 64 and one dtype.
        scale: multiplies the logits q k^T.
    Returns:
        (B, heads, N, dv). The fused path returns a view of (B, N, heads, dv) memory, so
        `.transpose(1, 2).reshape(B, N, heads * dv)` is free.

    Other Parameters:
        kernels: "fused", "reference", "portable" (`rgt.ops.portable`: SDPA in query chunks) or "auto" (fused
            where it can run, else portable); default: RGT_KERNELS, else "auto".
    """
    return OP.select(kernels or default_mode(), q)(q, k, v, scale)


def _register() -> None:
    """Defines the custom ops; skipped without Triton (then `triton_unavailable` routes to the reference)."""
    from rgt.kernels._common import triton_op
    from rgt.kernels.rg_attn import alloc_bwd, alloc_fwd, rgsa_attn_bwd, rgsa_attn_fwd

    @triton_op("rgt::rgsa_attn_fwd", fake=lambda q, k, v, scale: alloc_fwd(q, k, v))
    def fwd(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
        return rgsa_attn_fwd(q, k, v, scale)

    @triton_op("rgt::rgsa_attn_bwd", fake=lambda do, q, k, v, out, lse, scale: alloc_bwd(q, k, v))
    def bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
            scale: float) -> tuple[Tensor, Tensor, Tensor]:
        return rgsa_attn_bwd(do, q, k, v, out, lse, scale)

    def setup_context(ctx, inputs, output):
        q, k, v, scale = inputs
        out, lse = output
        ctx.mark_non_differentiable(lse)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale = scale

    def backward(ctx, d_out, _d_lse):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = torch.ops.rgt.rgsa_attn_bwd(d_out, q, k, v, out, lse, ctx.scale)
        return dq, dk, dv, None

    def double_backward(ctx, *grads):
        raise RuntimeError("rgt::rgsa_attn_fwd supports first-order gradients only (no double backward); "
                           "use kernels='reference' for higher-order gradients.")

    fwd.register_autograd(backward, setup_context=setup_context)
    bwd.register_autograd(double_backward)


if TRITON_OPS:
    _register()
