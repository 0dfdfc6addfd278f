"""Triton kernels, installed as `rgt.kernels` (never as a top-level `kernels` package)."""
