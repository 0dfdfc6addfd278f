"""Image files <-> float tensors (C, H, W) in [0, 1], with Pillow.

Reading keeps what SR needs to give back: grayscale stays 1 channel, alpha comes back separately (the model
sees only colour), 16-bit PNGs keep their 16 bits, and the EXIF orientation is applied (phone photos are
stored sideways). Writing is atomic: the file is encoded in memory, written to a temporary file in the same
folder and moved into place with `os.replace`, so an interrupted run never leaves a truncated image.

16-bit PNGs with more than one channel (RGB, RGBA, gray + alpha): Pillow decodes and encodes them only at 8
bits per channel (python-pillow/Pillow#1888, #7723), so they go through OpenCV (the `image16` extra,
`pip install "rgt[image16]"`, imported only for such files). 16-bit gray needs Pillow only.

Animated files (APNG, animated WebP, multi-page TIFF): the first frame is read, with a warning, as OpenCV-based
tools (Real-ESRGAN) do silently.
"""

from __future__ import annotations

import glob
import logging
import os
import uuid
from io import BytesIO
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

__all__ = ["ImageReadError", "LoadedImage", "read_image", "write_image", "IMAGE_EXTENSIONS"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
_WRITE_FORMATS = {
    ".png": "PNG",
    ".jpg": "JPEG",
    ".jpeg": "JPEG",
    ".webp": "WEBP",
    ".bmp": "BMP",
    ".tif": "TIFF",
    ".tiff": "TIFF",
}
_ORIENTATION = 0x0112  # EXIF tag
IMAGE16_HINT = 'pip install "rgt[image16]" (or opencv-python-headless)'
log = logging.getLogger("rgt")


class ImageReadError(OSError):
    """An image file that does not exist, is not an image, or is truncated or corrupt."""


class LoadedImage(NamedTuple):
    """image: float32 (C, H, W) in [0, 1], C = 3 (RGB) or 1 (gray); alpha: float32 (1, H, W) or None;
    bit_depth: 8 or 16, the precision of the file (write the result back with it)."""

    image: Tensor
    alpha: Tensor | None
    bit_depth: int


# ------------------------------------------------------------------------------------------------- reading


def _png_header(path: Path) -> tuple[int, int] | None:
    """(bit depth, colour type) from a PNG's IHDR chunk, which the format fixes at bytes 24 and 25."""
    with open(path, "rb") as f:
        head = f.read(26)
    if len(head) < 26 or head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        return None
    return head[24], head[25]


def _orient(arr: np.ndarray, orientation: int) -> np.ndarray:
    """Apply an EXIF orientation (1-8) to an (H, W, C) array, as Pillow's ImageOps.exif_transpose does."""
    ops = {
        2: lambda a: a[:, ::-1],
        3: lambda a: a[::-1, ::-1],
        4: lambda a: a[::-1],
        5: lambda a: a.transpose(1, 0, 2),
        6: lambda a: np.rot90(a, -1),
        7: lambda a: np.rot90(a, 2).transpose(1, 0, 2),
        8: lambda a: np.rot90(a, 1),
    }
    return ops[orientation](arr) if orientation in ops else arr


def _pillow_array(im: Image.Image) -> tuple[np.ndarray, int]:
    """Decoded Pillow image -> (H, W, C) uint8/uint16 array with C in {1, 2, 3, 4} (gray/RGB [+ alpha])."""
    mode = im.mode
    # older Pillow versions open 16-bit gray PNGs as "I"
    if mode.startswith("I;16") or (mode == "I" and im.format == "PNG"):
        arr = np.asarray(im).astype(np.uint16)  # any byte order -> native
        return arr[:, :, None], 16
    if mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    elif mode == "PA":
        im = im.convert("RGBA")
    elif mode == "1":
        im = im.convert("L")
    elif mode in ("RGBX", "CMYK", "YCbCr", "LAB", "HSV"):
        im = im.convert("RGB")
    elif mode in ("RGBa", "La"):
        im = im.convert(mode.upper())  # un-premultiply the alpha
    elif mode not in ("L", "LA", "RGB", "RGBA"):
        raise ImageReadError(f"unsupported image mode {mode!r}")
    arr = np.asarray(im)
    return (arr[:, :, None] if arr.ndim == 2 else arr), 8


def _opencv_png16(path: Path, gray_alpha: bool) -> np.ndarray:
    """A 16-bit colour or gray + alpha PNG -> (H, W, C) uint16 RGB, RGBA or gray + alpha."""
    try:
        import cv2
    except ImportError as e:
        raise ImageReadError(
            f"this is a 16-bit colour or gray + alpha PNG, which Pillow reads only at 8 bits: {IMAGE16_HINT} "
            "to read it at full precision"
        ) from e
    arr = cv2.imdecode(np.fromfile(path, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    if arr is None or arr.dtype != np.uint16 or arr.ndim != 3:
        raise ImageReadError("OpenCV could not decode it as a 16-bit colour PNG")
    if gray_alpha:  # OpenCV expands gray + alpha to BGRA
        return arr[:, :, [0, 3]]
    return arr[:, :, [2, 1, 0, 3][: arr.shape[2]]]  # BGR[A] -> RGB[A]


def _decode(path: Path) -> tuple[np.ndarray, int]:
    with Image.open(path) as im:
        im.load()  # decode now: truncated or corrupt data raises here
        if getattr(im, "n_frames", 1) > 1:
            log.warning("rgt: %s is animated (%d frames): only the first frame is used", path, im.n_frames)
        orientation = im.getexif().get(_ORIENTATION, 1)
        header = _png_header(path) if im.format == "PNG" else None
        if header is not None and header[0] == 16 and header[1] in (2, 4, 6):  # 16-bit RGB, gray + A, RGBA
            arr, bits = _opencv_png16(path, gray_alpha=header[1] == 4), 16
        else:
            arr, bits = _pillow_array(im)
    return _orient(arr, orientation), bits


def read_image(path: str | os.PathLike) -> LoadedImage:
    """Read a PNG/JPEG/WebP/BMP/TIFF file as float32 (C, H, W) in [0, 1], orientation applied.

    Returns:
        LoadedImage(image (3 or 1, H, W), alpha (1, H, W) or None, bit_depth 8 or 16). 16-bit values are
        k / 65535 (exact in float32: rounding `x * 65535` gives k back).

    Raises:
        ImageReadError (an OSError) naming the path, for missing, unreadable, truncated or unsupported files.
    """
    path = Path(path)
    try:
        arr, bits = _decode(path)
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:  # Pillow raises all of these
        raise ImageReadError(f"cannot read image {path}: {e}") from e
    x = torch.from_numpy(np.ascontiguousarray(arr).astype(np.float32) / (65535.0 if bits == 16 else 255.0))
    x = x.permute(2, 0, 1).contiguous()  # (H, W, C) -> (C, H, W)
    has_alpha = x.shape[0] in (2, 4)
    image, alpha = (x[:-1], x[-1:]) if has_alpha else (x, None)
    return LoadedImage(image, alpha, bits)


# ------------------------------------------------------------------------------------------------- writing


def _to_array(img: Tensor, alpha: Tensor | None, bit_depth: int) -> np.ndarray:
    """(C, H, W) [+ (1, H, W)] float in [0, 1] or uint8 -> (H, W, C') uint8/uint16, clipped and rounded."""
    if img.ndim == 2:
        img = img[None]
    if img.ndim != 3 or img.shape[0] not in (1, 3):
        raise ValueError(f"write_image needs an image (3 or 1, H, W) or (H, W), got shape {tuple(img.shape)}")
    if img.dtype == torch.uint8 and bit_depth == 8:
        img = img.float() / 255  # exact: rounding below gives the same integers back
    elif not img.is_floating_point():
        raise TypeError(f"write_image needs a float image in [0, 1] (or uint8 for 8 bits), got {img.dtype}")
    if alpha is not None:
        alpha = alpha[None] if alpha.ndim == 2 else alpha
        if tuple(alpha.shape) != (1, *img.shape[1:]):
            raise ValueError(f"alpha must be (1, H, W) = {(1, *img.shape[1:])}, got {tuple(alpha.shape)}")
        img = torch.cat([img, alpha.to(img.dtype)])
    peak = 65535 if bit_depth == 16 else 255
    q = torch.round(img.detach().float().clamp(0, 1) * peak).cpu().numpy()
    return q.astype(np.uint16 if bit_depth == 16 else np.uint8).transpose(1, 2, 0)


def _encode_png16(arr: np.ndarray) -> bytes:
    """(H, W, C) uint16 -> PNG bytes: gray with Pillow, colour (and gray + alpha) with OpenCV."""
    if arr.shape[2] == 1:
        buf = BytesIO()
        Image.fromarray(arr[:, :, 0]).save(buf, format="PNG")
        return buf.getvalue()
    try:
        import cv2
    except ImportError as e:
        raise ImportError(
            f"writing a 16-bit colour PNG needs OpenCV (Pillow writes 8 bits per channel): {IMAGE16_HINT}"
        ) from e
    if arr.shape[2] == 2:  # gray + alpha: PNG has no 16-bit LA encoder in OpenCV, store as RGBA
        arr = arr[:, :, [0, 0, 0, 1]]
    ok, data = cv2.imencode(".png", np.ascontiguousarray(arr[:, :, [2, 1, 0, 3][: arr.shape[2]]]))
    if not ok:
        raise ValueError("OpenCV failed to encode the 16-bit PNG")
    return data.tobytes()


def _encode(arr: np.ndarray, fmt: str, quality: int) -> bytes:
    if arr.dtype == np.uint16:
        return _encode_png16(arr)
    if fmt == "JPEG" and arr.shape[2] in (2, 4):
        raise ValueError("JPEG cannot store an alpha channel: write PNG or WebP")
    buf = BytesIO()
    im = Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr)
    options = {"quality": quality} if fmt in ("JPEG", "WEBP") else {}
    im.save(buf, format=fmt, **options)
    return buf.getvalue()


def write_image(
    path: str | os.PathLike,
    img: Tensor,
    *,
    alpha: Tensor | None = None,
    bit_depth: int = 8,
    quality: int = 95,
) -> None:
    """Write a float image in [0, 1] atomically; the format follows the extension.

    Args:
        path: destination (.png, .jpg/.jpeg, .webp, .bmp, .tif/.tiff); missing folders are created.
        img: (3, H, W) RGB, (1, H, W) or (H, W) gray, any device: float, clipped to [0, 1] and rounded to
            the bit depth; or uint8 for 8-bit files.
        alpha: optional (1, H, W) or (H, W) alpha in [0, 1] (not for JPEG).
        bit_depth: 8, or 16 for PNG only.
        quality: JPEG/WebP quality.
    """
    path = Path(path)
    fmt = _WRITE_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"cannot tell the image format of {path}: use one of {sorted(_WRITE_FORMATS)}")
    if bit_depth not in (8, 16) or (bit_depth == 16 and fmt != "PNG"):
        raise ValueError(f"bit_depth must be 8, or 16 for PNG; got {bit_depth} for {path}")
    data = _encode(_to_array(img, alpha, bit_depth), fmt, quality)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A run killed between write and rename leaves its `.<name>.<8 hex>.tmp`: the rerun writing name removes it.
    for stale in path.parent.glob(f".{glob.escape(path.name)}.{'[0-9a-f]' * 8}.tmp"):
        stale.unlink(missing_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        # os.open with 0o666 lets the umask set the permissions, as for any new file
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
