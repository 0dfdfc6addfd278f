"""The classical SR degradation: modcrop, then MATLAB bicubic downscaling, stored as uint8.

The benchmark and DF2K LR files were made with MATLAB as `imwrite(imresize(im2double(hr), 1/s, 'bicubic'))`:
`im2double` of a uint8 image is k/255 in float64, and `imwrite` clips to [0, 1] and rounds `255 * x` half up
to uint8. `bicubic_degrade` reproduces that bit for bit from uint8 input, on the tensor's device.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from rgt.data.resize import imresize

__all__ = ["bicubic_degrade", "modcrop", "quantize_uint8"]


def _check_scale(scale: int) -> None:
    if isinstance(scale, bool) or not isinstance(scale, int) or scale < 1:
        raise ValueError(f"scale must be a positive int, got {scale!r}")


def modcrop(img: Tensor | np.ndarray, scale: int) -> Tensor | np.ndarray:
    """Crop the bottom rows and right columns so that H and W are multiples of scale (top-left kept).

    Args:
        img: tensor (..., H, W), or numpy array (H, W) or (H, W, C).
        scale: the modulus (the SR scale, or 12 for BasicSR's MATLAB scripts).

    Returns:
        A view (..., H - H % scale, W - W % scale); BasicSR's validation crops the GT the same way.
    """
    _check_scale(scale)
    if img.ndim < 2:
        raise ValueError(f"modcrop needs an image with two spatial dims, got shape {tuple(img.shape)}")
    hw_axes = (0, 1) if isinstance(img, np.ndarray) else (img.ndim - 2, img.ndim - 1)
    h, w = (img.shape[a] for a in hw_axes)
    if h < scale or w < scale:
        raise ValueError(f"image {h}x{w} is smaller than the scale {scale}")
    index = [slice(None)] * img.ndim
    index[hw_axes[0]], index[hw_axes[1]] = slice(0, h - h % scale), slice(0, w - w % scale)
    return img[tuple(index)]


def quantize_uint8(img: Tensor) -> Tensor:
    """MATLAB's `imwrite` of a double image as uint8: clip to [0, 1], then round 255 * x half up.

    Half-up (not torch.round's half-to-even) matters: bicubic upscaling by 2 has dyadic weights, so exact
    .5 ties occur (181 on baboon x2), and MATLAB rounds them up.
    """
    return torch.floor(img.clamp(0, 1) * 255 + 0.5).to(torch.uint8)


def bicubic_degrade(hr: Tensor, scale: int, *, quantize: bool = True) -> Tensor:
    """MATLAB-exact bicubic downscaling by an integer factor, on hr's device, computed in float64.

    Args:
        hr: (..., H, W) with H and W multiples of scale (apply `modcrop` first): uint8 in [0, 255], or
            float in [0, 1].
        scale: integer downscaling factor.
        quantize: for float input, round the result to k/255 like the stored uint8 LR files. Rounding has no
            gradient: pass False for a differentiable degradation. uint8 input always gives uint8 output.

    Returns:
        (..., H/scale, W/scale), dtype of hr.

    Exactness: uint8 input reproduces MATLAB's LR files exactly. A float32 image of uint8 data holds
    float32(k/255), which differs from MATLAB's float64 k/255 by up to ~1e-8; after rounding, that flips a few
    pixels in a million by 1 LSB. Pass uint8 (as `rgt.data.prepare` does) when the files must match MATLAB.
    """
    _check_scale(scale)
    if hr.ndim < 2:
        raise ValueError(f"bicubic_degrade needs an image (..., H, W), got shape {tuple(hr.shape)}")
    h, w = hr.shape[-2:]
    if h % scale or w % scale or h == 0 or w == 0:
        raise ValueError(f"image size {h}x{w} must be a positive multiple of scale {scale}: modcrop first")
    if hr.dtype == torch.uint8:
        return quantize_uint8(imresize(hr.to(torch.float64) / 255, 1 / scale))
    if not hr.is_floating_point():
        raise TypeError(f"bicubic_degrade needs a uint8 or float image, got {hr.dtype}")
    lr = imresize(hr.to(torch.float64), 1 / scale)
    if quantize:
        lr = quantize_uint8(lr).to(torch.float64) / 255
    return lr.to(hr.dtype)
