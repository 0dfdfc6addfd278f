"""The RGT network: shallow conv, residual groups of L-SA / RG-SA blocks, pixel-shuffle reconstruction."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from rgt import heap
from rgt.arch.block import ResidualGroup, conv3x3_body
from rgt.arch.common import KernelSwitch, image_to_tokens, tokens_to_image
from rgt.arch.rgsa import MIN_EVAL_SIDE, RG_SA, recursion_depth
from rgt.ops._dispatch import check_mode, default_mode

RGB_MEAN = (0.4488, 0.4371, 0.4040)  # DIV2K mean, subtracted before and added after the network
NUM_FEAT = 64  # width of the reconstruction head


class Upsample(nn.Sequential):
    """Pixel-shuffle upsampler: log2(s) x [conv(64 -> 256), shuffle(2)] for s = 2^n,
    [conv(64 -> 576), shuffle(3)] for s = 3, nothing for s = 1."""

    def __init__(self, scale: int, num_feat: int):
        if scale == 1:
            layers = []
        elif scale & (scale - 1) == 0:
            layers = []
            for _ in range(int(math.log2(scale))):
                layers += [nn.Conv2d(num_feat, 4 * num_feat, 3, 1, 1), nn.PixelShuffle(2)]
        elif scale == 3:
            layers = [nn.Conv2d(num_feat, 9 * num_feat, 3, 1, 1), nn.PixelShuffle(3)]
        else:
            raise ValueError(f"upscale must be 1, 3 or a power of 2, got {scale}")
        super().__init__(*layers)


class RGT(KernelSwitch, nn.Module):
    """Recursive Generalization Transformer (Chen et al., ICLR 2024) with the official constructor.

    The state_dict matches the official checkpoints key for key (see `rgt.load_checkpoint`).

    Args:
        upscale: 1, 2^n or 3. in_chans: input/output channels. img_size: only sets the shape of the stored
            shift-mask buffers (64 in every official checkpoint); any input size works.
        img_range: inputs are (x - mean) * img_range. depth / num_heads: blocks and heads per residual group.
        embed_dim: C. mlp_ratio: MLP hidden width / C. qkv_bias, qk_scale: attention projections.
        drop_rate, attn_drop_rate, drop_path_rate: regularisation (drop path linear over all blocks).
        resi_connection: '1conv' or '3conv'. split_size: L-SA rectangle window (s0, s1). c_ratio: RG-SA
            channel ratio. use_chk: gradient checkpointing per block.
        kernels: "auto" (fused ops where available, else reference), "reference" (plain PyTorch), or "fused"
            (fused ops or an error). Default: the RGT_KERNELS environment variable, else "auto".
        check_finite: raise on NaN/Inf inputs (RG-SA is global: one bad pixel poisons the whole output).
    """

    def __init__(
        self,
        img_size: int = 64,
        in_chans: int = 3,
        embed_dim: int = 180,
        depth=(2, 2, 2, 2),
        num_heads=(2, 2, 2, 2),
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.1,
        act_layer=nn.GELU,
        norm_layer=nn.LayerNorm,
        use_chk: bool = False,
        upscale: int = 2,
        img_range: float = 1.0,
        resi_connection: str = "1conv",
        split_size=(8, 8),
        c_ratio: float = 0.5,
        *,
        kernels: str | None = None,
        check_finite: bool = True,
        **kwargs,
    ):
        super().__init__()
        if act_layer is not nn.GELU or norm_layer is not nn.LayerNorm:
            raise NotImplementedError("only the official act_layer=nn.GELU and norm_layer=nn.LayerNorm exist")
        if len(depth) != len(num_heads):
            raise ValueError(f"depth {list(depth)} and num_heads {list(num_heads)} must have the same length")
        self.in_chans, self.upscale, self.img_range = in_chans, upscale, img_range
        self.check_finite = check_finite
        # A plain constant in the official code, not in the state_dict: a non-persistent buffer keeps it so and
        # lets .to() move it. Created in float32: float64 models see the float32-rounded values, as officially.
        mean = torch.tensor(RGB_MEAN) if in_chans == 3 else torch.zeros(1)
        self.register_buffer("mean", mean.view(1, -1, 1, 1), persistent=False)

        self.conv_first = nn.Conv2d(in_chans, embed_dim, 3, 1, 1)
        self.before_RG = nn.Sequential(nn.Identity(), nn.LayerNorm(embed_dim))  # [0] stands for the flatten
        drop_paths = torch.linspace(0, drop_path_rate, sum(depth), device="cpu").tolist()
        block_args = dict(
            mlp_ratio=mlp_ratio,
            qkv_bias=qkv_bias,
            qk_scale=qk_scale,
            drop=drop_rate,
            attn_drop=attn_drop_rate,
            split_size=tuple(split_size),
            c_ratio=c_ratio,
            img_size=img_size,
        )
        self.layers = nn.ModuleList()
        for g, (d, h) in enumerate(zip(depth, num_heads, strict=True)):
            start = sum(depth[:g])
            self.layers.append(
                ResidualGroup(
                    embed_dim,
                    d,
                    g,
                    num_heads=h,
                    drop_paths=drop_paths[start : start + d],
                    use_chk=use_chk,
                    resi_connection=resi_connection,
                    **block_args,
                )
            )
        self.norm = nn.LayerNorm(embed_dim)
        self.conv_after_body = conv3x3_body(embed_dim, resi_connection)
        self.conv_before_upsample = nn.Sequential(
            nn.Conv2d(embed_dim, NUM_FEAT, 3, 1, 1), nn.LeakyReLU(inplace=True)
        )
        self.upsample = Upsample(upscale, NUM_FEAT)
        self.conv_last = nn.Conv2d(NUM_FEAT, in_chans, 3, 1, 1)
        self.apply(_init_weights)
        # channels_last conv weights: the tokens (B, H*W, C) seen as (B, C, H, W) are channels_last, and oneDNN
        # takes NCHW weights as a request to copy every conv's input to NCHW and give an NCHW output, which the
        # next token op copies back. The state_dict is unchanged (same keys, shapes and values).
        self.to(memory_format=torch.channels_last)
        self.set_kernels(default_mode() if kernels is None else kernels)

    def set_kernels(self, mode: str) -> None:
        """Switch every attention, convolution and fused-linear op between the modes of rgt.ops at run time."""
        self.kernels = check_mode(mode)
        for m in self.modules():
            if isinstance(m, KernelSwitch) and m is not self:
                m.set_kernels(mode)

    def forward_features(self, x: Tensor) -> Tensor:
        """(B, C, H, W) shallow features -> (B, C, H, W) deep features."""
        H, W = x.shape[-2:]
        x = self.before_RG(image_to_tokens(x))
        with heap.for_inference(x):  # CPU inference: freed tensors' memory reused (rgt.heap)
            for layer in self.layers:
                x = layer(x, H, W)
        return tokens_to_image(self.norm(x), H, W)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, in_chans, H, W) floating point ([0, 1] for the official weights) -> (B, in_chans, sH, sW)."""
        self._check_input(x)
        mean = self.mean.to(x.dtype)
        x = (x - mean) * self.img_range
        x = self.conv_first(x)
        x = self.conv_after_body(self.forward_features(x)) + x
        x = self.conv_last(self.upsample(self.conv_before_upsample(x)))
        return (x / self.img_range + mean).contiguous()  # channels_last from the convs

    def _check_input(self, x: Tensor) -> None:
        if not isinstance(x, Tensor) or x.ndim != 4:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"RGT expects a 4-D (B, C, H, W) tensor, got {shape}")
        if not x.is_floating_point():
            raise TypeError(
                f"RGT expects a floating-point input in [0, 1], got {x.dtype} (convert with x.float() / 255)"
            )
        if x.shape[1] != self.in_chans:
            raise ValueError(
                f"RGT was built for {self.in_chans} input channels, got {x.shape[1]} (shape {tuple(x.shape)})"
            )
        H, W = x.shape[-2:]
        if not self.training and min(H, W) < MIN_EVAL_SIDE:
            raise ValueError(
                f"RGT needs inputs of at least {MIN_EVAL_SIDE}x{MIN_EVAL_SIDE} px, got {H}x{W} "
                "(pad small images, e.g. with reflection, and crop the output)"
            )
        if self.layers and any(isinstance(b.attn, RG_SA) for g in self.layers for b in g.blocks):
            recursion_depth(H, W, self.training)
        if self.check_finite and not torch.isfinite(x).all():
            raise ValueError(
                "RGT input contains NaN or Inf (RG-SA is global: one bad pixel would make the whole "
                "output NaN); pass check_finite=False to skip this check"
            )


def _init_weights(m: nn.Module) -> None:
    """Official initialisation: truncated-normal(0.02) Linear weights, zero biases, unit LayerNorms."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
