"""The image layouts the public functions accept, converted to one internal form, with errors that name them.

numpy arrays are (H, W) or (H, W, C), as images come from PIL, OpenCV or imageio; tensors are (C, H, W) or
(B, C, H, W), as in torchvision. uint8 holds [0, 255]; float holds [0, 1]. A channel-last tensor or a
channel-first array is refused with the fix in the message, since guessing the layout from the shape fails on
small images.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

__all__ = ["UNIT_RANGE", "check_unit_range", "check_layout", "to_tensor"]

CHANNELS = (1, 2, 3, 4)  # gray, gray + alpha, RGB, RGBA
UNIT_RANGE = (-0.5, 1.5)  # float images outside this are not [0, 1] images with a little overshoot


def check_unit_range(x: Tensor | np.ndarray, name: str = "image") -> None:
    """Raise when a float image is clearly not in [0, 1] (e.g. 0..255 values)."""
    if isinstance(x, Tensor):
        x = x.detach()  # a range check, not part of the graph
    if x.size == 0 if isinstance(x, np.ndarray) else x.numel() == 0:
        return
    lo, hi = float(x.min()), float(x.max())
    if lo < UNIT_RANGE[0] or hi > UNIT_RANGE[1]:
        raise ValueError(f"float {name} must hold values in [0, 1], got [{lo:.4g}, {hi:.4g}]: divide 0..255 "
                         "images by 255 (or pass uint8)")


def check_layout(x: Tensor | np.ndarray, name: str = "image") -> None:
    """numpy (H, W) / (H, W, C) or tensor (C, H, W) / (B, C, H, W) with C in 1..4, no empty dimension."""
    if isinstance(x, np.ndarray):
        if x.ndim == 3 and x.shape[0] in CHANNELS and x.shape[2] not in CHANNELS:
            raise ValueError(f"numpy {name} is (H, W) or (H, W, C); shape {x.shape} looks like (C, H, W): "
                             "pass arr.transpose(1, 2, 0)")
        if x.ndim not in (2, 3) or (x.ndim == 3 and x.shape[2] not in CHANNELS):
            raise ValueError(f"numpy {name} must be (H, W) or (H, W, C) with C in {CHANNELS}, got shape {x.shape}")
    elif isinstance(x, Tensor):
        if x.ndim == 3 and x.shape[-1] in CHANNELS and x.shape[0] not in CHANNELS:
            raise ValueError(f"tensor {name} is (C, H, W) or (B, C, H, W); shape {tuple(x.shape)} looks like "
                             "(H, W, C): pass t.permute(2, 0, 1)")
        if x.ndim not in (3, 4) or x.shape[-3] not in CHANNELS:
            raise ValueError(f"tensor {name} must be (C, H, W) or (B, C, H, W) with C in {CHANNELS}, got shape "
                             f"{tuple(x.shape)}")
    else:
        raise TypeError(f"{name} must be a numpy array (H, W[, C]) or a tensor (C, H, W) / (B, C, H, W), got "
                        f"{type(x).__name__}")
    if 0 in x.shape:
        raise ValueError(f"{name} has an empty dimension: shape {tuple(x.shape)}")


def to_tensor(x: Tensor | np.ndarray, name: str = "image") -> tuple[Tensor, Callable[[Tensor], Tensor | np.ndarray]]:
    """Checked image -> ((C, H, W) or (B, C, H, W) tensor of the same dtype, the function that puts a result of
    that form back into the caller's layout: numpy (H, W[, C]) or the tensor as it is)."""
    check_layout(x, name)
    if isinstance(x, Tensor):
        return x, lambda y: y
    t = torch.from_numpy(np.ascontiguousarray(x))
    if x.ndim == 2:
        return t[None], lambda y: y[0].numpy()
    return t.permute(2, 0, 1), lambda y: y.permute(1, 2, 0).numpy()
