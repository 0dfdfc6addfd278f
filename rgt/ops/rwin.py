"""`rwin_attention`: L-SA rectangle-window attention (both branches, padding, shift, masks, bias) in one op.

Fused path: a Triton kernel that does the padding, shift and region masks as index arithmetic (kernels/),
not yet implemented.
"""

from __future__ import annotations

from torch import Tensor

from rgt.ops import reference
from rgt.ops._dispatch import Op, default_mode, triton_unavailable

OP = Op("rwin_attention", reference.rwin_attention, None, triton_unavailable)


def rwin_attention(qkv: Tensor, bias_table: Tensor, H: int, W: int, split: tuple[int, int], shift: bool,
                   heads: int, scale: float, *, kernels: str | None = None) -> Tensor:
    """Rectangle-window attention of L-SA; see `rgt.ops.reference.rwin_attention` for the exact semantics.

    Args:
        qkv: (B, H*W, 3C) projection output. bias_table: (2, M, heads // 2), M = (2*s0-1)(2*s1-1).
    Returns:
        (B, H*W, C), channels [branch 0 (s0 x s1 windows) | branch 1 (s1 x s0 windows)].
    """
    return OP.select(kernels or default_mode(), qkv)(qkv, bias_table, H, W, split, shift, heads, scale)
