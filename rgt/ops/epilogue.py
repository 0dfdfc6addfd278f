"""Linear layers with their epilogue fused, for inference on a CPU: the bias, a GELU or a residual add applied
inside the matmul's output pass by oneDNN (`torch.ops.mkldnn._linear_pointwise`, the op Inductor's CPU backend
emits), instead of one more pass over memory each.

On a CPU RGT is bound by memory traffic around its matmuls: at 256x256 a (H*W, C) token tensor is 47 MB, and
`F.linear` first writes the broadcast bias into its output, then GELU and every residual add read and write the
whole tensor again. Fused, RGT-S x4's fp32 forward at 256x256 took 14.0-17.3 s instead of 16.4-18.5 s (2-core
Xeon, torch 2.13, interleaved; no change at 128x128). The sums are those of the plain ops up to fp32 rounding
(oneDNN's own matmul and erf-GELU; tests/test_epilogue.py bounds both).

`applies` says when: a float32 CPU tensor, no autograd, the module in eval mode and not on the reference
kernels, no autocast, no tracing/compiling/export (those see the plain ops), and oneDNN's op present. Elsewhere
`linear` is exactly the plain layer, so training, the reference and every other device are untouched.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rgt.ops._dispatch import tracing


@functools.cache
def available() -> bool:
    """Whether this torch has oneDNN's fused linear (x86 and arm64 wheels do); probed once on a tiny input."""
    try:
        x, w, b = torch.ones(2, 3), torch.ones(4, 3), torch.zeros(4)
        out = torch.ops.mkldnn._linear_pointwise.binary(x, torch.ones(2, 4), w, b, "add")
        gelu = torch.ops.mkldnn._linear_pointwise(x, w, b, "gelu", [], "none")
    except (AttributeError, RuntimeError, NotImplementedError):
        return False
    return bool((out == 4).all() and torch.allclose(gelu, F.gelu(torch.full((2, 4), 3.0))))


def applies(x: Tensor, module: nn.Module) -> bool:
    """Whether `module`'s linears on input x take the fused path (see the module docstring)."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and not module.training
            and getattr(module, "kernels", "auto") != "reference" and not torch.is_grad_enabled()
            and not torch.is_autocast_enabled("cpu") and not tracing() and available())


def linear(x: Tensor, layer: nn.Linear, fused: bool, *, gelu: bool = False, add: Tensor | None = None,
           drop: nn.Module | None = None) -> Tensor:
    """add + drop(gelu(layer(x))), each part optional. x: (..., in) -> (..., out); add: the output's shape.

    fused=True runs it as one oneDNN matmul (callers pass `applies(...)`; dropout is then inactive, eval mode).
    """
    if not fused:
        y = layer(x)
        y = F.gelu(y) if gelu else y
        y = drop(y) if drop is not None else y
        return y if add is None else add + y
    return linear_weights(x, layer.weight, layer.bias, gelu=gelu, add=add)


def linear_weights(x: Tensor, weight: Tensor, bias: Tensor | None, *, gelu: bool = False,
                   add: Tensor | None = None) -> Tensor:
    """The fused matmul of `linear` from raw weights (e.g. half of a layer): gelu and add are exclusive."""
    if add is not None:
        if gelu:
            raise ValueError("one fused epilogue at a time: gelu or add")
        return torch.ops.mkldnn._linear_pointwise.binary(x, add, weight, bias, "add")
    if gelu:
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "gelu", [], "none")
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
