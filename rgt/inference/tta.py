"""Self-ensemble ("RGT+"): the 8 flips and rotations of the input, run through the model and averaged.

The official repository has no self-ensemble; this is the standard EDSR-style x8 geometric ensemble.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["dihedral", "dihedral_inverse", "tta_forward"]


def dihedral(x: Tensor, k: int) -> Tensor:
    """Transform k in 0..7 of the square's symmetry group on the last two dims: rot90 by k % 4, then a
    horizontal flip when k >= 4."""
    y = torch.rot90(x, k % 4, dims=(-2, -1))
    return y.flip(-1) if k >= 4 else y


def dihedral_inverse(y: Tensor, k: int) -> Tensor:
    """Undo `dihedral(., k)`."""
    y = y.flip(-1) if k >= 4 else y
    return torch.rot90(y, -(k % 4), dims=(-2, -1))


def tta_forward(fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """Mean over the 8 transforms t of t^-1(fn(t(x))); fn: (B, C, h, w) -> (B, C, s h, s w), float32 result."""
    total = None
    for k in range(8):
        y = dihedral_inverse(fn(dihedral(x, k)), k).float()
        total = y if total is None else total + y
    return total / 8
