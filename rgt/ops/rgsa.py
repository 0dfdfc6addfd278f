"""`rgsa_attention`: RG-SA cross-attention of all tokens against the small representative map.

Fused path: a flash-style Triton kernel (kernels/), not yet implemented.
"""

from __future__ import annotations

from torch import Tensor

from rgt.ops import reference
from rgt.ops._dispatch import Op, default_mode, triton_unavailable

OP = Op("rgsa_attention", reference.rgsa_attention, None, triton_unavailable)


def rgsa_attention(q: Tensor, k: Tensor, v: Tensor, scale: float, *, kernels: str | None = None) -> Tensor:
    """softmax(q k^T * scale) v.

    Args:
        q: (B, heads, N, dqk). k: (B, heads, N', dqk). v: (B, heads, N', dv).
    Returns:
        (B, heads, N, dv).
    """
    return OP.select(kernels or default_mode(), q)(q, k, v, scale)
