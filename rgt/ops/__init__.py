"""RGT's ops, each with a fused implementation, a plain-PyTorch reference (`rgt.ops.reference`) and, for the
attentions, a memory-bounded portable version (`rgt.ops.portable`); `rgt.ops.epilogue` fuses the linears' bias,
GELU and residual adds for CPU inference."""

from rgt.ops import epilogue, portable, reference
from rgt.ops._dispatch import MODES
from rgt.ops.dwconv import recursive_dwconv
from rgt.ops.rgsa import rgsa_attention
from rgt.ops.rwin import rwin_attention

__all__ = ["MODES", "epilogue", "portable", "recursive_dwconv", "reference", "rgsa_attention", "rwin_attention"]
