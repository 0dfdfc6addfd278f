"""Inference around the RGT model: the `Upscaler` (input kinds, gray/alpha, padding, precision, tiles with OOM
fallback, self-ensemble) and its building blocks. The command lines are `rgt.upscale` and `rgt.evaluate`."""

from rgt.inference.tiling import pad_to_valid, tiled_forward, valid_size
from rgt.inference.tta import dihedral, dihedral_inverse, tta_forward
from rgt.inference.upscaler import Upscaler, resolve_device, resolve_precision

__all__ = [
    "Upscaler",
    "dihedral",
    "dihedral_inverse",
    "pad_to_valid",
    "resolve_device",
    "resolve_precision",
    "tiled_forward",
    "tta_forward",
    "valid_size",
]
