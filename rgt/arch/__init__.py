"""The RGT architecture; module and attribute names follow the official state_dict."""

from rgt.arch.rgt import RGT

__all__ = ["RGT"]
