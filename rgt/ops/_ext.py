"""Loads the compiled extension `rgt._C` once and explains a failure instead of hiding it."""

from __future__ import annotations

import functools

import torch


@functools.cache
def load_error() -> str | None:
    """None when `rgt._C` is importable (its ops are then registered under torch.ops.rgt), else why not."""
    try:
        from rgt import _C  # noqa: F401
    except ImportError as exc:
        built = _built_torch_version()
        hint = "Build it with `pip install --no-build-isolation -e .` against the torch you run."
        if built is not None and built != torch.__version__:
            hint = (
                f"It was built for torch {built} but torch {torch.__version__} is installed; rebuild with "
                "`pip install --no-build-isolation -e .`."
            )
        return f"the C++ extension rgt._C could not be loaded ({exc}). {hint}"
    return None


def _built_torch_version() -> str | None:
    try:
        from rgt._build_info import TORCH_VERSION
    except ImportError:
        return None
    return TORCH_VERSION


def built_kernels() -> str:
    """'cpu', 'cpu+cuda', or 'none' when the extension is missing."""
    return "none" if load_error() else torch.ops.rgt.build_info()
