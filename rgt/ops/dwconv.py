"""`recursive_dwconv`: the recursive depthwise stride-k convolution of RG-SA's generalization module.

Fused path: the C++/CUDA op `torch.ops.rgt.recursive_dwconv` from `rgt._C` (csrc/), not yet implemented.
"""

from __future__ import annotations

from torch import Tensor

from rgt.ops import reference
from rgt.ops._dispatch import Op, default_mode, extension_unavailable

OP = Op("recursive_dwconv", reference.recursive_dwconv, None, extension_unavailable)


def recursive_dwconv(x: Tensor, weight: Tensor, bias: Tensor | None, times: int, *,
                     kernels: str | None = None) -> Tensor:
    """Depthwise conv (kernel = stride = k, no padding) applied `times` times with shared weights.

    Args:
        x: (B, C, H, W), contiguous or channels_last. weight: (C, 1, k, k). bias: (C,) or None.
    Returns:
        (B, C, H // k**times, W // k**times).
    """
    return OP.select(kernels or default_mode(), x)(x, weight, bias, times)
