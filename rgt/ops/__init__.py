"""RGT's ops, each with a fused implementation, a plain-PyTorch reference (`rgt.ops.reference`) and, for the
attentions, a memory-bounded portable version (`rgt.ops.portable`)."""

from rgt.ops import portable, reference
from rgt.ops._dispatch import MODES
from rgt.ops.dwconv import recursive_dwconv
from rgt.ops.rgsa import rgsa_attention
from rgt.ops.rwin import rwin_attention

__all__ = ["MODES", "portable", "recursive_dwconv", "reference", "rgsa_attention", "rwin_attention"]
