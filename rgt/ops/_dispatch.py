"""Choosing between the fused kernels and the plain-PyTorch reference, per op and per input tensor.

Modes: "reference" always runs `rgt.ops.reference` (the float64-faithful oracle); "fused" runs the Triton / C++
op and raises if it cannot; "portable" runs `rgt.ops.portable` (memory-bounded SDPA attentions, any device;
the reference for ops without a portable version); "auto" runs the fused op where it can run on the given
tensor and the portable one otherwise. The environment variable RGT_KERNELS sets the default mode.

Availability: a Triton kernel runs on CUDA tensors, or on CPU tensors only under TRITON_INTERPRET=1 (the
interpreter the tests use); a C++ op runs wherever `rgt._C` was built with a kernel for the tensor's device.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from rgt.ops import _ext

MODES = ("auto", "reference", "fused", "portable")
# Triton ops are defined with torch.library.triton_op / wrap_triton, which torch 2.6 introduced.
HAS_TRITON = importlib.util.find_spec("triton") is not None
TRITON_OPS = HAS_TRITON and hasattr(torch.library, "triton_op")
log = logging.getLogger("rgt.ops")


def tracing() -> bool:
    """Whether torch is tracing, compiling or exporting: run-time side paths (oneDNN's fused linears, the heap
    policy of rgt.heap) then stay out, so that graphs see the plain ops."""
    exporting = getattr(torch.compiler, "is_exporting", lambda: False)  # torch >= 2.7
    return torch.compiler.is_compiling() or exporting() or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"kernels must be one of {MODES}, got {mode!r}")
    return mode


def default_mode() -> str:
    """The mode named by RGT_KERNELS, or "auto"."""
    mode = os.environ.get("RGT_KERNELS", "auto")
    if mode not in MODES:
        raise ValueError(f"RGT_KERNELS must be one of {MODES}, got {mode!r}")
    return mode


def triton_unavailable(x: Tensor) -> str | None:
    """Why a Triton kernel cannot run on `x`, or None when it can."""
    interpreting = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if not (x.is_cuda or interpreting):
        return (
            f"Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 on CPU); got a {x.device.type} tensor"
        )
    if not HAS_TRITON:
        return "Triton is not installed (pip install triton)"
    if not TRITON_OPS:
        return f"the Triton ops need torch >= 2.6 (torch.library.triton_op); torch {torch.__version__} is installed"
    return None


def extension_unavailable(x: Tensor) -> str | None:
    """Why a C++/CUDA op of rgt._C cannot run on `x`, or None when it can."""
    err = _ext.load_error()
    if err is not None:
        return err
    if x.is_cuda and "cuda" not in _ext.built_kernels():
        return (
            "rgt._C was built without CUDA kernels; rebuild with a CUDA torch and toolkit: "
            "`pip install --no-build-isolation -e .`"
        )
    if x.device.type not in ("cpu", "cuda"):
        return f"rgt._C has no kernels for {x.device.type} tensors"
    return None


@dataclass(frozen=True)
class Op:
    """One op and its implementations. `unavailable(x)` says why `fused` cannot run on x (None: it can);
    `portable` (None: the reference) is what runs where the fused op cannot."""

    name: str
    reference: Callable
    fused: Callable | None
    unavailable: Callable[[Tensor], str | None]
    portable: Callable | None = None

    def path(self, mode: str, x: Tensor) -> tuple[str, str | None]:
        """("fused" | "portable" | "reference", why not fused) for `mode` on x; raises if "fused" cannot run."""
        fallback = "reference" if self.portable is None else "portable"
        if mode in ("reference", "portable"):
            return (mode if mode == "reference" else fallback), f"kernels={mode!r}"
        reason = "not implemented yet" if self.fused is None else self.unavailable(x)
        if reason is None:
            return "fused", None
        if mode == "fused":
            exc = NotImplementedError if self.fused is None else RuntimeError
            raise exc(
                f"kernels='fused': no fused {self.name} for this input: {reason}. "
                "Use kernels='auto' to fall back to the portable ops."
            )
        return fallback, reason

    def select(self, mode: str, x: Tensor) -> Callable:
        path, reason = self.path(mode, x)
        _say_path(self.name, path, reason, x)
        return self.portable if path == "portable" else getattr(self, path)


_said: set[tuple] = set()


def _say_path(name: str, path: str, reason: str | None, x: Tensor) -> None:
    """Log each (op, path, device, dtype) once, not per call (a training run calls each op thousands of times).
    A missing build is worth one warning; a CPU tensor without the interpreter is expected (DEBUG log)."""
    key = (name, path, x.device.type, x.dtype)
    if key in _said:
        return
    _said.add(key)
    if reason is not None and "rgt._C" in reason and "rgt._C" not in _said:
        _said.add("rgt._C")
        warnings.warn(f"rgt: falling back to reference ops: {reason}", RuntimeWarning, stacklevel=3)
    else:
        log.debug("rgt: %s runs the %s on %s %s%s", name, path, x.device.type, str(x.dtype).removeprefix("torch."),
                  f": {reason}" if reason else "")
