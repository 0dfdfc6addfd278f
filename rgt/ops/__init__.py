"""RGT's ops, each with a fused implementation and a plain-PyTorch reference (`rgt.ops.reference`)."""

from rgt.ops import reference
from rgt.ops._dispatch import MODES
from rgt.ops.dwconv import recursive_dwconv
from rgt.ops.rgsa import rgsa_attention
from rgt.ops.rwin import rwin_attention

__all__ = ["MODES", "recursive_dwconv", "reference", "rgsa_attention", "rwin_attention"]
