"""Small building blocks shared by the RGT modules."""

from __future__ import annotations

from torch import Tensor, nn

from rgt.ops._dispatch import check_mode


class DropPath(nn.Module):
    """Stochastic depth: zero a sample's residual branch with probability p, rescale survivors by 1/(1-p)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask.div_(keep)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class KernelSwitch:
    """Mixin for modules whose ops dispatch between fused kernels and the reference (see rgt.ops)."""

    kernels: str = "auto"

    def set_kernels(self, mode: str) -> None:
        self.kernels = check_mode(mode)


def tokens_to_image(x: Tensor, H: int, W: int) -> Tensor:
    """(B, H*W, C) tokens -> (B, C, H, W). A view (channels_last strides) when x is contiguous."""
    return x.transpose(1, 2).unflatten(2, (H, W))


def image_to_tokens(x: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, H*W, C)."""
    return x.flatten(2).transpose(1, 2)
