"""PSNR and SSIM exactly as the SR papers compute them (BasicSR's `calculate_psnr` / `calculate_ssim`).

The protocol, and why each part matters (other libraries differ by up to 1.3 dB):
- the SR output is rounded to uint8 first (BasicSR's `tensor2img`);
- `crop_border` pixels (the scale) are cut from every side;
- Y is BT.601 as in MATLAB's rgb2ycbcr, Y = 16 + (65.481 R + 128.553 G + 24.966 B) / 255 for R, G, B in
  [0, 255], *not* rounded (limited range: full-range Y costs 20 log10(255/219) = 1.32 dB);
- PSNR in float64 with peak 255, averaged per image by the caller;
- SSIM (Wang et al.) per channel with an 11x11 Gaussian window, sigma 1.5, on the valid region only (no
  padding, no downsampling), C1 = (0.01 * 255)^2, C2 = (0.03 * 255)^2, then the mean over map and channels.

Two entry points compute the same numbers (to ~1e-12 dB):
- `psnr` / `ssim`: numpy reference path on one image (H, W, C) or (H, W) as images come: uint8 (or integers)
  and float in [0, 255] used as given (the BasicSR convention), float in [0, 1] (every value within
  [-0.5, 1.5]) quantized to [0, 255] as `tensor2img` does. Given tensors, they call the torch path.
- `psnr_torch` / `ssim_torch`: batched tensors (B, C, H, W) or (C, H, W), float in [0, 1] (quantized here as
  `tensor2img` does) or uint8, on any device: for validation on the GPU. They return one value per image.
Other layouts (a channel-last tensor, a channel-first array) and 0..255 float tensors raise an error naming
the expected layout and range.

Other libraries: pyiqa matches the PSNR only with `create_metric('psnr', test_y_channel=True,
color_space='ycbcr', crop_border=s)` on quantized inputs, and its SSIM rounds Y; piq and torchmetrics use
other Y definitions, windows or borders by default.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from rgt.data.layout import UNIT_RANGE, check_layout, check_unit_range, to_tensor

__all__ = ["psnr", "ssim", "psnr_torch", "ssim_torch"]

Y_COEFFS = (65.481, 128.553, 24.966)  # BT.601 R, G, B weights for inputs in [0, 1], output in [0, 255]
WINDOW, SIGMA = 11, 1.5
C1, C2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2


def _gaussian() -> np.ndarray:
    """The normalised 1-D Gaussian (11 taps, sigma 1.5); the 2-D window is its outer product."""
    x = np.arange(WINDOW, dtype=np.float64) - (WINDOW - 1) / 2
    g = np.exp(-(x * x) / (2 * SIGMA * SIGMA))
    return g / g.sum()


def _check_pair(
    shape_sr: tuple, shape_hr: tuple, hwc: tuple[int, int, int], crop_border: int, y_channel: bool
) -> None:
    """hwc: height, width and channel count of one image."""
    if shape_sr != shape_hr:
        raise ValueError(f"sr and hr shapes differ: {shape_sr} vs {shape_hr}")
    if isinstance(crop_border, bool) or not isinstance(crop_border, int) or crop_border < 0:
        raise ValueError(f"crop_border must be an int >= 0, got {crop_border!r}")
    h, w, channels = hwc
    if min(h, w) <= 2 * crop_border:
        raise ValueError(f"crop_border {crop_border} leaves nothing of a {h}x{w} image")
    if y_channel and channels not in (1, 3):
        raise ValueError(f"y_channel needs 3 (RGB) or 1 (already gray) channels, got {channels}")


def _check_window(hw: tuple[int, int]) -> None:
    if min(hw) < WINDOW:
        raise ValueError(f"SSIM needs at least {WINDOW}x{WINDOW} pixels after the crop, got {hw[0]}x{hw[1]}")


# ----------------------------------------------------------------------------------------------------- numpy


def _to_255(img: np.ndarray) -> np.ndarray:
    """float64 in [0, 255]: integers and [0, 255] floats as given, [0, 1] floats rounded like tensor2img."""
    x = np.asarray(img, dtype=np.float64)
    if img.dtype.kind == "f" and img.size and UNIT_RANGE[0] <= x.min() and x.max() <= UNIT_RANGE[1]:
        return np.round(np.clip(img.astype(np.float32), 0, 1) * 255).astype(np.float64)
    return x


def _numpy_planes(img: np.ndarray, crop_border: int, y_channel: bool) -> np.ndarray:
    """(H, W[, C]) -> float64 (C', H', W') in [0, 255] after the crop and optional Y conversion."""
    x = _to_255(img)
    x = x[:, :, None] if x.ndim == 2 else x
    if crop_border:
        x = x[crop_border:-crop_border, crop_border:-crop_border]
    x = x.transpose(2, 0, 1)
    if y_channel and x.shape[0] == 3:
        r, g, b = x / 255
        x = (r * Y_COEFFS[0] + g * Y_COEFFS[1] + b * Y_COEFFS[2] + 16)[None]
    return x


def _check_numpy(sr: np.ndarray, hr: np.ndarray, crop_border: int, y_channel: bool) -> None:
    for name, a in (("sr", sr), ("hr", hr)):
        check_layout(a, name)
        if a.dtype.kind not in "uif":
            raise TypeError(f"{name} must be an integer array in [0, 255] or a float one in [0, 1] or [0, 255], "
                            f"got {a.dtype}")
    hwc = (*sr.shape[:2], sr.shape[2] if sr.ndim == 3 else 1)
    _check_pair(sr.shape, hr.shape, hwc, crop_border, y_channel)


def psnr(sr: np.ndarray | Tensor, hr: np.ndarray | Tensor, crop_border: int, y_channel: bool = True) -> float:
    """PSNR in dB of one image pair (H, W[, C]), uint8 or float (see the module docstring for the ranges); inf
    for identical images. Tensors go to `psnr_torch` (one value, or one per image of a batch)."""
    if isinstance(sr, Tensor) or isinstance(hr, Tensor):
        return _torch_result(psnr_torch(*_as_tensors(sr, hr), crop_border, y_channel))
    _check_numpy(sr, hr, crop_border, y_channel)
    a, b = _numpy_planes(sr, crop_border, y_channel), _numpy_planes(hr, crop_border, y_channel)
    mse = np.mean((a - b) ** 2)
    return math.inf if mse == 0 else float(10 * np.log10(255.0 * 255.0 / mse))


def _filter_valid(x: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Separable 'valid' correlation of (H, W) with the outer product of g: (H - 10, W - 10)."""
    n = len(g)
    h, w = x.shape
    rows = sum(g[k] * x[k : h - n + 1 + k] for k in range(n))
    return sum(g[k] * rows[:, k : w - n + 1 + k] for k in range(n))


def _ssim_plane(a: np.ndarray, b: np.ndarray, g: np.ndarray) -> float:
    mu_a, mu_b = _filter_valid(a, g), _filter_valid(b, g)
    var_a = _filter_valid(a * a, g) - mu_a * mu_a
    var_b = _filter_valid(b * b, g) - mu_b * mu_b
    cov = _filter_valid(a * b, g) - mu_a * mu_b
    num = (2 * mu_a * mu_b + C1) * (2 * cov + C2)
    den = (mu_a * mu_a + mu_b * mu_b + C1) * (var_a + var_b + C2)
    return float(np.mean(num / den))


def ssim(sr: np.ndarray | Tensor, hr: np.ndarray | Tensor, crop_border: int, y_channel: bool = True) -> float:
    """SSIM of one image pair (H, W[, C]) as in `psnr`: the mean over channels of the mean SSIM map. Tensors
    go to `ssim_torch`."""
    if isinstance(sr, Tensor) or isinstance(hr, Tensor):
        return _torch_result(ssim_torch(*_as_tensors(sr, hr), crop_border, y_channel))
    _check_numpy(sr, hr, crop_border, y_channel)
    a, b = _numpy_planes(sr, crop_border, y_channel), _numpy_planes(hr, crop_border, y_channel)
    _check_window(a.shape[1:])
    g = _gaussian()
    return float(np.mean([_ssim_plane(pa, pb, g) for pa, pb in zip(a, b, strict=True)]))


# ----------------------------------------------------------------------------------------------------- torch


def _torch_planes(img: Tensor, crop_border: int, y_channel: bool, quantize: bool) -> Tensor:
    """(B, C, H, W) uint8, or float in [0, 1] -> float64 in [0, 255] (B, C', H', W'), cropped, maybe Y."""
    if img.dtype == torch.uint8:
        x = img.to(torch.float64)
    elif quantize:
        # BasicSR's tensor2img: float32, clamp, * 255, round half to even, uint8.
        x = torch.round(img.float().clamp(0, 1) * 255).to(torch.float64)
    else:
        x = img.to(torch.float64) * 255
    if crop_border:
        x = x[..., crop_border:-crop_border, crop_border:-crop_border]
    if y_channel and x.shape[1] == 3:
        r, g, b = (x / 255).unbind(1)
        x = (r * Y_COEFFS[0] + g * Y_COEFFS[1] + b * Y_COEFFS[2] + 16)[:, None]
    return x


def _as_tensors(sr: np.ndarray | Tensor, hr: np.ndarray | Tensor) -> tuple[Tensor, Tensor]:
    """A tensor and a numpy image (e.g. a model output and an image file) -> two tensors on one device."""
    device = (sr if isinstance(sr, Tensor) else hr).device
    return tuple(x if isinstance(x, Tensor) else to_tensor(x, name)[0].to(device)
                 for x, name in ((sr, "sr"), (hr, "hr")))


def _torch_result(value: Tensor) -> float | Tensor:
    return float(value) if value.ndim == 0 else value


def _check_torch(sr: Tensor, hr: Tensor, crop_border: int, y_channel: bool) -> None:
    for name, t in (("sr", sr), ("hr", hr)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a tensor (B, C, H, W) or (C, H, W) like the other, got "
                            f"{type(t).__name__}")
        check_layout(t, name)
        if t.dtype != torch.uint8 and not t.is_floating_point():
            raise TypeError(f"{name} must be uint8 in [0, 255] or float in [0, 1], got {t.dtype}")
        if t.is_floating_point():
            check_unit_range(t, name)
    hwc = (sr.shape[-2], sr.shape[-1], sr.shape[-3])
    _check_pair(tuple(sr.shape), tuple(hr.shape), hwc, crop_border, y_channel)


def _torch_pair(
    sr: Tensor, hr: Tensor, crop_border: int, y_channel: bool, quantize: bool
) -> tuple[Tensor, Tensor]:
    """Checked inputs -> float64 planes (B, C', H', W') of both images, batched even for (C, H, W) input."""
    _check_torch(sr, hr, crop_border, y_channel)
    sr, hr = (sr, hr) if sr.ndim == 4 else (sr[None], hr[None])
    return tuple(_torch_planes(x, crop_border, y_channel, quantize) for x in (sr, hr))


def psnr_torch(
    sr: Tensor, hr: Tensor, crop_border: int, y_channel: bool = True, *, quantize: bool = True
) -> Tensor:
    """Batched PSNR in dB, equal to `psnr` on the uint8 images.

    Args:
        sr, hr: (B, C, H, W) or (C, H, W), uint8 in [0, 255] or float in [0, 1], same device.
        crop_border: pixels cut from every side (the SR scale).
        y_channel: compare BT.601 Y instead of all channels (gray inputs are used as they are).
        quantize: round float inputs to uint8 levels first, as BasicSR's validation does. False measures the
            raw float output (not the paper protocol).

    Returns:
        float64 (B,), or a scalar for unbatched input; inf where the images are identical.
    """
    a, b = _torch_pair(sr, hr, crop_border, y_channel, quantize)
    mse = ((a - b) ** 2).mean(dim=(1, 2, 3))
    out = 10 * torch.log10(255.0 * 255.0 / mse)
    return out if sr.ndim == 4 else out[0]


def _filter_valid_torch(x: Tensor, g: Tensor) -> Tensor:
    """Separable 'valid' Gaussian correlation of (N, 1, H, W): (N, 1, H - 10, W - 10)."""
    return F.conv2d(F.conv2d(x, g.view(1, 1, -1, 1)), g.view(1, 1, 1, -1))


def ssim_torch(
    sr: Tensor, hr: Tensor, crop_border: int, y_channel: bool = True, *, quantize: bool = True
) -> Tensor:
    """Batched SSIM, equal to `ssim` on the uint8 images. Arguments and shapes as in `psnr_torch`."""
    a, b = _torch_pair(sr, hr, crop_border, y_channel, quantize)
    _check_window(tuple(a.shape[-2:]))
    n, c, h, w = a.shape
    g = torch.from_numpy(_gaussian()).to(a.device)
    # All statistics of all channels in one batched filter: (5 * B * C, 1, H, W), channels kept separate.
    stats = _filter_valid_torch(torch.stack([a, b, a * a, b * b, a * b]).view(5 * n * c, 1, h, w), g)
    mu_a, mu_b, aa, bb, ab = stats.view(5, n, c, h - WINDOW + 1, w - WINDOW + 1)
    var_a, var_b, cov = aa - mu_a * mu_a, bb - mu_b * mu_b, ab - mu_a * mu_b
    num = (2 * mu_a * mu_b + C1) * (2 * cov + C2)
    den = (mu_a * mu_a + mu_b * mu_b + C1) * (var_a + var_b + C2)
    out = (num / den).mean(dim=(2, 3)).mean(dim=1)
    return out if sr.ndim == 4 else out[0]
