"""The classical SR degradation: modcrop, then MATLAB bicubic downscaling, stored as uint8.

The benchmark and DF2K LR files were made with MATLAB as `imwrite(imresize(im2double(hr), 1/s, 'bicubic'))`:
`im2double` of a uint8 image is k/255 in float64, and `imwrite` clips to [0, 1] and rounds `255 * x` half up
to uint8. `bicubic_degrade` reproduces that bit for bit from uint8 input, on the tensor's device.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from rgt.data.layout import check_unit_range, to_tensor
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


def bicubic_degrade(hr: Tensor | np.ndarray, scale: int, *, quantize: bool = True) -> Tensor | np.ndarray:
    """MATLAB-exact bicubic downscaling by an integer factor, on hr's device, computed in float64.

    Args:
        hr: an image as it comes, H and W multiples of scale (apply `modcrop` first): numpy (H, W) or (H, W, C)
            (PIL / OpenCV / imageio order), or a tensor (C, H, W) or (B, C, H, W); uint8 in [0, 255] or float
            in [0, 1]. Other layouts, dtypes or a 0..255 float image raise an error that names the layout.
        scale: integer downscaling factor.
        quantize: for float input, round the result to k/255 like the stored uint8 LR files. Rounding has no
            gradient: pass False for a differentiable degradation. uint8 input always gives uint8 output.

    Returns:
        The same kind, layout and dtype as hr, H/scale x W/scale.

    Exactness: uint8 input reproduces MATLAB's LR files exactly. A float32 image of uint8 data holds
    float32(k/255), which differs from MATLAB's float64 k/255 by up to ~1e-8; after rounding, that flips a few
    pixels in a million by 1 LSB. Pass uint8 (as `rgt.data.prepare` does) when the files must match MATLAB.
    """
    _check_scale(scale)
    x, back = to_tensor(hr, "hr")
    h, w = x.shape[-2:]
    if h % scale or w % scale:
        raise ValueError(f"hr size {h}x{w} (H x W) must be a multiple of scale {scale}: modcrop first")
    if x.dtype == torch.uint8:
        return back(quantize_uint8(imresize(x.to(torch.float64) / 255, 1 / scale)))
    if not x.is_floating_point():
        raise TypeError(f"bicubic_degrade needs uint8 or float images (uint8 in [0, 255], float in [0, 1]), got "
                        f"{x.dtype}")
    check_unit_range(x, "hr")
    lr = imresize(x.to(torch.float64), 1 / scale)
    if quantize:
        lr = quantize_uint8(lr).to(torch.float64) / 255
    return back(lr.to(x.dtype))
