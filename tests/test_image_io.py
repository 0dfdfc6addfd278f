"""rgt.data.io: round trips (8/16-bit, gray, alpha, every format), EXIF orientation, bad files, atomic writes.

16-bit PNGs with more than one channel need OpenCV (Pillow decodes them at 8 bits); those tests skip
without it. The 16-bit readers are checked against PNGs built here byte by byte, independent of both
libraries' encoders.
"""

import os
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from _utils import gen
from PIL import Image, ImageOps

from rgt.data import ImageReadError, read_image, write_image


def _rand(case: str, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.rand(shape, generator=gen(case))


def _levels(x: torch.Tensor, peak: int) -> torch.Tensor:
    return torch.round(x * peak).to(torch.int64)


def _png16_bytes(arr: np.ndarray, color_type: int) -> bytes:
    """A minimal valid 16-bit PNG (filter 0 on every row, one IDAT) of an (H, W, C) uint16 array."""
    h, w = arr.shape[:2]
    raw = b"".join(b"\x00" + arr[i].astype(">u2").tobytes() for i in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize("channels", [3, 1])
@pytest.mark.parametrize("ext", [".png", ".bmp", ".tif"])
def test_lossless_8bit_round_trip(tmp_path, ext, channels):
    img = _rand(f"rt8-{ext}-{channels}", (channels, 13, 17))
    path = tmp_path / f"a{ext}"
    write_image(path, img)
    back = read_image(path)
    assert back.bit_depth == 8 and back.alpha is None
    assert back.image.dtype == torch.float32 and back.image.shape == (channels, 13, 17)
    assert torch.equal(_levels(back.image, 255), _levels(img, 255))


def test_rgba_and_gray_alpha_round_trip(tmp_path):
    for channels in (3, 1):
        img, alpha = _rand(f"alpha-{channels}", (channels, 9, 11)), _rand(f"alpha-a-{channels}", (1, 9, 11))
        write_image(tmp_path / "a.png", img, alpha=alpha)
        back = read_image(tmp_path / "a.png")
        assert back.image.shape == (channels, 9, 11) and back.alpha.shape == (1, 9, 11)
        assert torch.equal(_levels(back.image, 255), _levels(img, 255))
        assert torch.equal(_levels(back.alpha, 255), _levels(alpha, 255))


def test_uint8_tensor_and_clipping(tmp_path):
    q = (torch.arange(3 * 4 * 5) % 256).to(torch.uint8).view(3, 4, 5)
    write_image(tmp_path / "u8.png", q)
    assert torch.equal(_levels(read_image(tmp_path / "u8.png").image, 255), q.long())
    write_image(tmp_path / "clip.png", torch.tensor([[[-0.5, 1.5]]]))
    assert read_image(tmp_path / "clip.png").image.flatten().tolist() == [0.0, 1.0]


def test_16bit_gray_round_trip_pillow_only(tmp_path):
    img = _rand("rt16-gray", (1, 7, 10))
    write_image(tmp_path / "g16.png", img, bit_depth=16)
    back = read_image(tmp_path / "g16.png")
    assert back.bit_depth == 16 and back.image.shape == (1, 7, 10)
    assert torch.equal(_levels(back.image, 65535), _levels(img, 65535))  # 16 bits survive float32


@pytest.mark.parametrize(
    "color_type,channels", [(0, 1), (2, 3), (4, 2), (6, 4)], ids=["L", "RGB", "LA", "RGBA"]
)
def test_read_16bit_png_built_by_hand(tmp_path, color_type, channels):
    if color_type != 0:
        pytest.importorskip("cv2", reason="16-bit colour PNGs are read with OpenCV")
    arr = np.random.default_rng(color_type).integers(0, 65536, (5, 7, channels), dtype=np.uint16)
    (tmp_path / "h.png").write_bytes(_png16_bytes(arr, color_type))
    back = read_image(tmp_path / "h.png")
    full = back.image if back.alpha is None else torch.cat([back.image, back.alpha])
    assert back.bit_depth == 16 and full.shape == (channels, 5, 7)
    assert np.array_equal(_levels(full, 65535).permute(1, 2, 0).numpy(), arr)


def test_16bit_colour_round_trip(tmp_path):
    pytest.importorskip("cv2", reason="16-bit colour PNGs are written with OpenCV")
    img, alpha = _rand("rt16-rgb", (3, 6, 9)), _rand("rt16-a", (1, 6, 9))
    write_image(tmp_path / "c16.png", img, alpha=alpha, bit_depth=16)
    back = read_image(tmp_path / "c16.png")
    assert back.bit_depth == 16
    assert torch.equal(_levels(back.image, 65535), _levels(img, 65535))
    assert torch.equal(_levels(back.alpha, 65535), _levels(alpha, 65535))


@pytest.mark.parametrize("ext", [".jpg", ".webp"])
def test_lossy_formats(tmp_path, ext):
    # A smooth image: lossy codecs keep it within a few levels.
    y, x = torch.meshgrid(torch.linspace(0, 1, 32), torch.linspace(0, 1, 48), indexing="ij")
    img = torch.stack([x, y, (x + y) / 2])
    write_image(tmp_path / f"a{ext}", img, quality=95)
    back = read_image(tmp_path / f"a{ext}")
    assert back.image.shape == (3, 32, 48) and back.bit_depth == 8
    assert (back.image - img).abs().mean() < 0.01


def test_palette_with_transparency(tmp_path):
    im = Image.new("P", (4, 3))
    im.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    im.putpixel((1, 1), 1)
    im.save(tmp_path / "p.png", transparency=0)
    back = read_image(tmp_path / "p.png")
    assert back.image.shape == (3, 3, 4) and back.alpha is not None
    assert (
        back.image[:, 1, 1].tolist() == [0.0, 1.0, 0.0]
        and back.alpha[0, 1, 1] == 1
        and back.alpha[0, 0, 0] == 0
    )


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation(tmp_path, orientation):
    arr = (np.arange(5 * 8 * 3) % 251).astype(np.uint8).reshape(5, 8, 3)  # not square: catches transposes
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(arr).save(tmp_path / "o.png", exif=exif)
    expected = np.asarray(ImageOps.exif_transpose(Image.open(tmp_path / "o.png")))
    got = _levels(read_image(tmp_path / "o.png").image, 255).permute(1, 2, 0).numpy()
    assert np.array_equal(got, expected)


def test_bad_files_name_the_path(tmp_path):
    write_image(tmp_path / "good.png", _rand("trunc", (3, 64, 64)))
    data = (tmp_path / "good.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.png").write_text("not an image")
    write_image(tmp_path / "good.jpg", _rand("trunc-jpg", (3, 64, 64)))
    jpg = (tmp_path / "good.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(jpg[: len(jpg) // 2])
    for name in ("truncated.png", "text.png", "missing.png", "truncated.jpg"):
        with pytest.raises(ImageReadError, match=f"cannot read image .*{name}"):
            read_image(tmp_path / name)


def test_write_errors(tmp_path):
    img = torch.zeros(3, 4, 4)
    with pytest.raises(ValueError, match="JPEG cannot store an alpha"):
        write_image(tmp_path / "a.jpg", img, alpha=torch.zeros(1, 4, 4))
    with pytest.raises(ValueError, match="or 16 for PNG"):
        write_image(tmp_path / "a.jpg", img, bit_depth=16)
    with pytest.raises(ValueError, match="cannot tell the image format"):
        write_image(tmp_path / "a.xyz", img)
    with pytest.raises(ValueError, match=r"\(3 or 1, H, W\)"):
        write_image(tmp_path / "a.png", torch.zeros(2, 4, 4))
    with pytest.raises(ValueError, match="alpha must be"):
        write_image(tmp_path / "a.png", img, alpha=torch.zeros(1, 4, 5))
    with pytest.raises(TypeError, match="float image"):
        write_image(tmp_path / "a.png", torch.zeros(3, 4, 4, dtype=torch.int32))
    assert list(tmp_path.iterdir()) == []  # nothing, not even a temporary file, is left behind


def test_atomic_write(tmp_path, monkeypatch):
    path = tmp_path / "sub" / "out.png"  # missing folders are created
    write_image(path, torch.zeros(1, 4, 4))
    before = path.read_bytes()
    write_image(path, torch.ones(1, 4, 4))  # replaces
    assert read_image(path).image.min() == 1

    def interrupted(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_image(path, torch.zeros(1, 4, 4))
    assert path.read_bytes() != before and read_image(path).image.min() == 1  # old file intact
    assert sorted(p.name for p in Path(path.parent).iterdir()) == ["out.png"]  # temp file removed


def test_16bit_colour_without_opencv_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "cv2", None)  # makes `import cv2` raise ImportError
    (tmp_path / "c.png").write_bytes(_png16_bytes(np.zeros((2, 2, 3), np.uint16), 2))
    with pytest.raises(ImageReadError, match=r"c.png.*pip install \"rgt\[image16\]\""):
        read_image(tmp_path / "c.png")
    with pytest.raises(ImportError, match=r"rgt\[image16\]"):
        write_image(tmp_path / "d.png", torch.zeros(3, 2, 2), bit_depth=16)


def test_write_removes_what_a_killed_write_of_the_same_file_left(tmp_path):
    """A kill between the temp file's write and its rename leaves `.<name>.<8 hex>.tmp`; the next write of that
    name removes it (and nothing else)."""
    stale = tmp_path / ".out.png.0123abcd.tmp"
    others = [tmp_path / ".other.png.0123abcd.tmp", tmp_path / ".out.png.notours.tmp"]
    for f in [stale, *others]:
        f.write_bytes(b"partial")
    write_image(tmp_path / "out.png", torch.zeros(3, 4, 4))
    assert not stale.exists() and all(f.exists() for f in others)
    assert sorted(f.name for f in tmp_path.iterdir()) == sorted([".other.png.0123abcd.tmp", ".out.png.notours.tmp",
                                                                  "out.png"])
