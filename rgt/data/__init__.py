"""Image pipeline shared by training, validation and evaluation: MATLAB-exact bicubic resize and degradation,
and image file I/O. The metrics live in `rgt.metrics`; `python -m rgt.data.prepare` builds LR folders."""

from rgt.data.degrade import bicubic_degrade, modcrop, quantize_uint8
from rgt.data.io import IMAGE_EXTENSIONS, ImageReadError, LoadedImage, read_image, write_image
from rgt.data.resize import imresize

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageReadError",
    "LoadedImage",
    "bicubic_degrade",
    "imresize",
    "modcrop",
    "quantize_uint8",
    "read_image",
    "write_image",
]
