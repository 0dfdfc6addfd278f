"""RG-SA: recursive-generalization self-attention. Every token attends to a small representative map made by
applying one strided depthwise conv T times (weights shared), refined, and projected to keys and values."""

from __future__ import annotations

from torch import Tensor, nn

from rgt.arch.common import KernelSwitch, image_to_tokens, tokens_to_image
from rgt.ops import epilogue, recursive_dwconv, rgsa_attention

MIN_EVAL_SIDE = 16  # eval mode takes floor(log4(side // 16)): smaller sides have no defined recursion depth


def _floor_log4(n: int) -> int:
    """Exact floor(log4(n)) for n >= 1 (the official int(math.log(n, 4)) agrees for every n < 5000)."""
    t = 0
    while n >= 4:
        n //= 4
        t += 1
    return t


def recursion_depth(H: int, W: int, training: bool, stride: int = 4) -> int:
    """Number T of strided-conv applications for an H x W map, as the official code chooses it.

    Train: T = max(log4(H//4), log4(W//4)). Eval: T = max(log4(H//16), log4(W//16)), at least 2 (the depth the
    model was trained with on 64 x 64 patches). Raises ValueError where the official code dies with a math
    domain error (a side too small) or a kernel-size error (a side that the recursion shrinks to 0).
    """
    div = stride if training else MIN_EVAL_SIDE
    if min(H, W) < div:
        mode = "training" if training else "inference"
        raise ValueError(f"RGT {mode} needs both sides of the input >= {div} px, got {H}x{W}")
    t = max(_floor_log4(H // div), _floor_log4(W // div))
    if not training:
        t = max(t, 2)
    if min(H, W) < stride**t:
        raise ValueError(
            f"input {H}x{W} is too elongated for RG-SA: the longer side sets {t} recursions of the "
            f"stride-{stride} conv, which need the shorter side >= {stride**t} px (pad the image or use tiles)"
        )
    return t


class RG_SA(KernelSwitch, nn.Module):  # noqa: N801 (official name)
    """Cross-attention of all H*W tokens to the floor(H/4^T) x floor(W/4^T) representative tokens.

    Args:
        dim: C. num_heads: heads (q/k head dim C*c_ratio/heads, v head dim C/heads).
        c_ratio: channel ratio cr/C.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool = False,
        qk_scale: float | None = None,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        c_ratio: float = 0.5,
    ):
        super().__init__()
        cr = int(dim * c_ratio)
        if dim % num_heads or cr % num_heads:
            raise ValueError(f"RG-SA needs dim={dim} and dim*c_ratio={cr} divisible by num_heads={num_heads}")
        if attn_drop != 0.0:
            raise NotImplementedError("attention dropout is not supported (every official config uses 0)")
        self.dim, self.num_heads, self.cr = dim, num_heads, cr
        # Official scale: (head_dim * c_ratio)^-0.5, with head_dim = C // heads (equals (cr/heads)^-0.5 here).
        self.scale = qk_scale or (dim // num_heads * c_ratio) ** -0.5
        self.reduction1 = nn.Conv2d(dim, dim, kernel_size=4, stride=4, groups=dim)
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim)
        self.conv = nn.Conv2d(dim, cr, kernel_size=1)
        self.norm_act = nn.Sequential(nn.LayerNorm(cr), nn.GELU())
        self.q = nn.Linear(dim, cr, bias=qkv_bias)
        self.k = nn.Linear(cr, cr, bias=qkv_bias)
        self.v = nn.Linear(cr, dim, bias=qkv_bias)
        self.cpe = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: Tensor, H: int, W: int, residual: Tensor | None = None) -> Tensor:
        """x: (B, H*W, C) normalised tokens -> (B, H*W, C), plus `residual` (same shape) when given."""
        B, N, C = x.shape
        h = self.num_heads
        T = recursion_depth(H, W, self.training)
        fused = epilogue.applies(x, self)
        q = epilogue.linear(x, self.q, fused).view(B, N, h, -1).transpose(1, 2)  # (B, h, N, cr/h)

        r = recursive_dwconv(
            tokens_to_image(x, H, W), self.reduction1.weight, self.reduction1.bias, T, kernels=self.kernels
        )  # (B, C, H/4^T, W/4^T)
        hr, wr = r.shape[-2:]
        r = self.norm_act(image_to_tokens(self.conv(self.dwconv(r))))  # (B, N', cr)
        k = self.k(r).view(B, -1, h, self.cr // h).transpose(1, 2)  # (B, h, N', cr/h)
        v = self.v(r).view(B, -1, h, C // h).transpose(1, 2)  # (B, h, N', C/h)

        # Conditional position encoding on the representative values, heads merged back into channels.
        v_img = v.transpose(-2, -1).reshape(B, C, hr, wr)  # channel = head * C/h + d
        v = v + self.cpe(v_img).reshape(B, h, C // h, -1).transpose(-2, -1)

        out = rgsa_attention(q, k, v, self.scale, kernels=self.kernels)  # (B, h, N, C/h)
        return epilogue.linear(out.transpose(1, 2).reshape(B, N, C), self.proj, fused, add=residual,
                               drop=self.proj_drop)
