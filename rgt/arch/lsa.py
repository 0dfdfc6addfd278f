"""L-SA: rectangle-window self-attention (Rwin-SA, from CAT) with a dynamic relative-position bias.

Module and buffer names follow the official checkpoints. The attention itself (padding, branch split, shift,
masks, bias gather) is the single op `rgt.ops.rwin_attention`; this module owns the parameters around it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from rgt.arch.common import KernelSwitch, image_to_tokens, tokens_to_image
from rgt.ops import epilogue, reference, rwin_attention


def _ln_relu_linear(dim: int, out: int) -> nn.Sequential:
    return nn.Sequential(nn.LayerNorm(dim), nn.ReLU(inplace=True), nn.Linear(dim, out))


class DynamicPosBias(nn.Module):
    """MLP from raw (dh, dw) offsets to one bias per head: Linear, then three LN -> ReLU -> Linear stages.

    `dim` is already divided by 4 by the caller and is divided by 4 again here (official quirk), so the hidden
    width is ((C/2)//4)//4: 5 for C=180, and 1 for C=36, where the table is constant per head.
    """

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        width = dim // 4
        self.pos_proj = nn.Linear(2, width)
        self.pos1 = _ln_relu_linear(width, width)
        self.pos2 = _ln_relu_linear(width, width)
        self.pos3 = _ln_relu_linear(width, num_heads)

    def forward(self, offsets: Tensor) -> Tensor:
        """offsets: (M, 2) -> (M, num_heads)."""
        return self.pos3(self.pos2(self.pos1(self.pos_proj(offsets))))


class WindowAttention(nn.Module):
    """Per-branch holder of the position-bias MLP and its two constant tables (kept for checkpoint parity).

    Branch 0 uses split[0] x split[1] windows, branch 1 the transpose. `rpe_biases` (M, 2) are the MLP's
    inputs; `relative_position_index` (N, N) maps query/key pairs to table rows. Both are deterministic:
    slim checkpoints omit them and they are rebuilt here.
    """

    def __init__(self, dim: int, branch: int, split: tuple[int, int], num_heads: int):
        super().__init__()
        hs, ws = reference.branch_geometry(split, branch)
        self.pos = DynamicPosBias(dim // 4, num_heads)
        self.register_buffer("rpe_biases", reference.relative_offsets(hs, ws))
        self.register_buffer(
            "relative_position_index", reference.relative_position_index(hs, ws, torch.device("cpu")).clone()
        )
        # Buffers are registered before `pos` in state_dict order because own buffers precede children.

    def bias_table(self) -> Tensor:
        """(M, heads) bias for every relative offset of the window."""
        return self.pos(self.rpe_biases)


class L_SA(KernelSwitch, nn.Module):  # noqa: N801 (official name)
    """Local self-attention over rectangle windows, two branches of half the channels each.

    Args:
        dim: C. num_heads: total heads (each branch gets num_heads // 2). split_size: (s0, s1).
        shift: shifted block (cyclic shift by half a window with region masks).
        img_size: only sets the shape of the stored mask buffers (64 x 64 in the checkpoints).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        split_size=(8, 8),
        shift: bool = False,
        qkv_bias: bool = False,
        qk_scale: float | None = None,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        img_size: int = 64,
    ):
        super().__init__()
        if num_heads < 2 or (dim // 2) % (num_heads // 2) != 0:
            raise ValueError(
                f"L-SA needs num_heads >= 2 and (dim/2) divisible by num_heads//2; got dim={dim}, "
                f"num_heads={num_heads}"
            )
        if attn_drop != 0.0:
            raise NotImplementedError("attention dropout is not supported (every official config uses 0)")
        self.dim, self.num_heads, self.split_size = dim, num_heads, (int(split_size[0]), int(split_size[1]))
        self.shift = shift
        self.scale = qk_scale or ((dim // 2) // (num_heads // 2)) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(drop)
        self.attns = nn.ModuleList(
            WindowAttention(dim // 2, i, self.split_size, num_heads // 2) for i in range(2)
        )
        if shift:
            hp, wp = reference.padded_size(img_size, img_size, self.split_size)
            for i in range(2):
                hs, ws = reference.branch_geometry(self.split_size, i)
                mask = reference.shift_mask(hp, wp, hs, ws, torch.device("cpu"), torch.float32).clone()
                self.register_buffer(f"attn_mask_{i}", mask)
        self.get_v = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim)

    def forward(self, x: Tensor, H: int, W: int, residual: Tensor | None = None) -> Tensor:
        """x: (B, H*W, C) normalised tokens -> (B, H*W, C), plus `residual` (same shape) when given."""
        fused = epilogue.applies(x, self)
        qkv = epilogue.linear(x, self.qkv, fused)  # (B, L, 3C), features [q | k | v]
        table = self.bias_tables()  # (2, M, heads // 2)
        y = rwin_attention(
            qkv, table, H, W, self.split_size, self.shift, self.num_heads, self.scale, kernels=self.kernels
        )
        # LCM: depthwise conv on the unpadded v, added to the attention output.
        v_img = tokens_to_image(qkv[..., 2 * self.dim :], H, W)  # (B, C, H, W)
        y = y + image_to_tokens(self.get_v(v_img))
        return epilogue.linear(y, self.proj, fused, add=residual, drop=self.proj_drop)

    def bias_tables(self) -> Tensor:
        """(2, M, heads // 2): both branches' position-bias tables, from their MLPs."""
        return torch.stack([a.bias_table() for a in self.attns])
