"""`recursive_dwconv`: the recursive depthwise stride-k convolution of RG-SA's generalization module.

Fused path: the C++/CUDA ops `rgt::recursive_dwconv_fwd` and `rgt::recursive_dwconv_bwd` of `rgt._C` (csrc/),
which compute every level in one pass and recompute the inner levels in the backward instead of saving them.
This module adds their fake (meta) kernels, so they trace under torch.compile, and their autograd formula.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rgt.ops import _ext, reference
from rgt.ops._dispatch import Op, default_mode, extension_unavailable


def _layout(x: Tensor) -> torch.memory_format:
    """Memory format of the op's outputs: the rule of `layout_of` in csrc/recursive_dwconv.h."""
    return torch.channels_last if x.shape[1] > 1 and x.stride(1) == 1 else torch.contiguous_format


def _fwd_fake(x: Tensor, weight: Tensor, bias: Tensor | None, times: int) -> Tensor:
    k = weight.shape[-1]
    B, C, H, W = x.shape
    size = (B, C, H // k**times, W // k**times)  # floor at every level equals floor by k**times
    return torch.empty(size, dtype=x.dtype, device=x.device, memory_format=_layout(x))


def _bwd_fake(grad_out: Tensor, x: Tensor, weight: Tensor, bias: Tensor | None,
              times: int) -> tuple[Tensor, Tensor, Tensor]:
    grad_x = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=_layout(x))
    grad_w = torch.empty(weight.shape, dtype=x.dtype, device=x.device)
    return grad_x, grad_w, x.new_empty((x.shape[1],))


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, times = inputs
    ctx.save_for_backward(x, weight, bias)
    ctx.times = times


def _backward(ctx, grad_out: Tensor):
    x, weight, bias = ctx.saved_tensors
    grad_x, grad_w, grad_b = torch.ops.rgt.recursive_dwconv_bwd(grad_out, x, weight, bias, ctx.times)
    return grad_x, grad_w, (grad_b if bias is not None else None), None


def _no_double_backward(ctx, *grads):
    raise RuntimeError("rgt.ops.recursive_dwconv: double backward is not supported by the fused op; "
                       "use kernels='reference' for higher-order gradients")


if _ext.load_error() is None:
    torch.library.register_fake("rgt::recursive_dwconv_fwd")(_fwd_fake)
    torch.library.register_fake("rgt::recursive_dwconv_bwd")(_bwd_fake)
    torch.library.register_autograd("rgt::recursive_dwconv_fwd", _backward, setup_context=_setup_context)
    # Without an autograd formula the dispatcher would only warn and return wrong second derivatives.
    torch.library.register_autograd("rgt::recursive_dwconv_bwd", _no_double_backward,
                                    setup_context=lambda ctx, inputs, output: None)


def _fused(x: Tensor, weight: Tensor, bias: Tensor | None, times: int) -> Tensor:
    if times == 0:
        return x  # as the reference: no level at all
    device = x.device.type
    if torch.is_autocast_enabled(device):  # as F.conv2d under autocast: run in the autocast dtype
        dtype = torch.get_autocast_dtype(device)
        x, weight = x.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    return torch.ops.rgt.recursive_dwconv_fwd(x, weight, bias, times)


OP = Op("recursive_dwconv", reference.recursive_dwconv, _fused, extension_unavailable)


def recursive_dwconv(x: Tensor, weight: Tensor, bias: Tensor | None, times: int, *,
                     kernels: str | None = None) -> Tensor:
    """Depthwise conv (kernel = stride = k, no padding) applied `times` times with shared weights.

    Each level drops the rows and columns left over by the stride (PyTorch's floor semantics).

    Args:
        x: (B, C, H, W), contiguous or channels_last (the model's tokens (B, H*W, C) viewed as
            (B, C, H, W) are channels_last and are read in place). weight: (C, 1, k, k). bias: (C,) or None.
        times: number of levels, >= 0; every level's input must be at least k x k.
    Returns:
        (B, C, H // k**times, W // k**times), in x's memory format.

    Performance:
        kernels: "fused" (the C++/CUDA op of rgt._C; raises if it is not built), "reference" (F.conv2d chain)
            or "auto" (fused where rgt._C can run, else the reference with one warning). Default: RGT_KERNELS.
    """
    return OP.select(kernels or default_mode(), x)(x, weight, bias, times)
