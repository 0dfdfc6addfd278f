"""The transformer block (attention + gated MLP + HAI adaptor) and the residual group."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from rgt.arch.common import DropPath, KernelSwitch, image_to_tokens, tokens_to_image
from rgt.arch.lsa import L_SA
from rgt.arch.rgsa import RG_SA
from rgt.ops import epilogue


class Gate(nn.Module):
    """Spatial gate: split features in halves, x1 * dwconv3x3(LayerNorm(x2)). No activation inside."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.conv = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim)

    def forward(self, x1: Tensor, x2: Tensor, H: int, W: int) -> Tensor:
        """x1, x2: (B, L, dim), the two halves of the MLP's hidden features -> (B, L, dim)."""
        x2 = image_to_tokens(self.conv(tokens_to_image(self.norm(x2), H, W)))
        return x1 * x2


class MLP(KernelSwitch, nn.Module):
    """Gated MLP: fc1 (C -> hid) -> GELU -> Gate (hid -> hid/2) -> fc2 (hid/2 -> C), dropout after each."""

    def __init__(self, in_features: int, hidden_features: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.sg = Gate(hidden_features // 2)
        self.fc2 = nn.Linear(hidden_features // 2, in_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x: Tensor, H: int, W: int, residual: Tensor | None = None) -> Tensor:
        """x: (B, L, C) -> (B, L, C), plus `residual` (same shape) when given."""
        fused = epilogue.applies(x, self)
        if fused:  # fc1 as the gate's two halves with GELU in the matmul: no strided copy for the gate's norm
            x1, x2 = (epilogue.linear_weights(x, w, b, gelu=True)
                      for w, b in zip(self.fc1.weight.chunk(2), self.fc1.bias.chunk(2), strict=True))
        else:
            x1, x2 = self.drop(self.act(self.fc1(x))).chunk(2, dim=-1)
        x = self.drop(self.sg(x1, x2, H, W))
        return epilogue.linear(x, self.fc2, fused, add=residual, drop=self.drop)


def is_shifted(group: int, block: int) -> bool:
    """Which L-SA blocks shift their windows: L-SA blocks alternate n/S across group boundaries (6-block
    groups: even groups shift block 2, odd groups blocks 0 and 4), exactly as the official rule below."""
    if group % 2 == 0:
        return block > 0 and (block - 2) % 4 == 0
    return block % 4 == 0


class Block(KernelSwitch, nn.Module):
    """Pre-norm block: x1 = x + attn(norm1(x)); x2 = x1 + mlp(norm2(x1)); out = x2 + gamma * x (HAI).

    Even blocks use L-SA, odd blocks RG-SA. gamma re-injects the block input, scaled per channel.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        group: int,
        index: int,
        *,
        mlp_ratio: float,
        qkv_bias: bool,
        qk_scale: float | None,
        drop: float,
        attn_drop: float,
        drop_path: float,
        split_size,
        c_ratio: float,
        img_size: int,
        layerscale_value: float = 1e-4,
    ):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), layerscale_value))
        self.norm1 = nn.LayerNorm(dim)
        if index % 2 == 0:
            self.attn = L_SA(
                dim,
                num_heads,
                split_size,
                is_shifted(group, index),
                qkv_bias,
                qk_scale,
                drop,
                attn_drop,
                img_size,
            )
        else:
            self.attn = RG_SA(dim, num_heads, qkv_bias, qk_scale, attn_drop, drop, c_ratio)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.mlp = MLP(dim, int(dim * mlp_ratio), drop)
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, x: Tensor, H: int, W: int) -> Tensor:
        if epilogue.applies(x, self):  # CPU inference: the residual adds inside the output projections
            x1 = self.attn(self.norm1(x), H, W, residual=x)
            return self.mlp(self.norm2(x1), H, W, residual=torch.addcmul(x1, x, self.gamma))
        res = x
        x = x + self.drop_path(self.attn(self.norm1(x), H, W))
        x = x + self.drop_path(self.mlp(self.norm2(x), H, W))
        return x + res * self.gamma


class ResidualGroup(nn.Module):
    """A stack of blocks, then a conv on the image-shaped features, plus the group input."""

    def __init__(
        self,
        dim: int,
        depth: int,
        group: int,
        *,
        drop_paths: list[float],
        use_chk: bool,
        resi_connection: str,
        **block_args,
    ):
        super().__init__()
        self.use_chk = use_chk
        self.blocks = nn.ModuleList(
            Block(dim, group=group, index=i, drop_path=drop_paths[i], **block_args) for i in range(depth)
        )
        self.conv = conv3x3_body(dim, resi_connection)

    def forward(self, x: Tensor, H: int, W: int) -> Tensor:
        res = x
        for blk in self.blocks:
            if self.use_chk and torch.is_grad_enabled():
                x = checkpoint(blk, x, H, W, use_reentrant=False)
            else:
                x = blk(x, H, W)
        return res + image_to_tokens(self.conv(tokens_to_image(x, H, W)))


def conv3x3_body(dim: int, resi_connection: str) -> nn.Module:
    """'1conv': one 3x3 conv. '3conv': the bottleneck conv(C/4) -> 1x1 -> conv(C) with LeakyReLU(0.2)."""
    if resi_connection == "1conv":
        return nn.Conv2d(dim, dim, 3, 1, 1)
    if resi_connection == "3conv":
        return nn.Sequential(
            nn.Conv2d(dim, dim // 4, 3, 1, 1),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(dim // 4, dim // 4, 1, 1, 0),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(dim // 4, dim, 3, 1, 1),
        )
    raise ValueError(f"resi_connection must be '1conv' or '3conv', got {resi_connection!r}")
