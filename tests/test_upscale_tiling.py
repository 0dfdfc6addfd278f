"""Tiles, blending, padding and the out-of-memory / NaN fallbacks of `rgt.Upscaler`."""

import logging

import pytest
import torch
import torch.nn.functional as F
from _utils import TINY, gen

import rgt
from rgt.inference import pad_to_valid, tiled_forward, valid_size
from rgt.inference.tiling import tile_starts
from rgt.metrics import psnr_torch


def nearest(x):
    return F.interpolate(x, scale_factor=2, mode="nearest")


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return rgt.RGT(**TINY, kernels="reference").eval()


@pytest.mark.parametrize("size,tile,overlap", [(100, 32, 8), (33, 32, 8), (32, 32, 8), (10, 32, 8), (77, 20, 0)])
def test_tile_starts(size, tile, overlap):
    starts = tile_starts(size, min(tile, size), overlap)
    tile = min(tile, size)
    assert starts[0] == 0 and starts[-1] + tile == size
    assert all(b - a <= tile - overlap for a, b in zip(starts, starts[1:], strict=False))  # neighbours share >= overlap


@pytest.mark.parametrize("tile,overlap", [(16, 4), (24, 8), (20, 0), (64, 8)])
def test_stitching_is_exact_for_a_pointwise_model(tile, overlap):
    """With a model that needs no context, the blended tiles reproduce the whole image: weights sum right."""
    x = torch.rand(2, 3, 37, 50, generator=gen(f"pointwise-{tile}-{overlap}"))
    torch.testing.assert_close(tiled_forward(nearest, x, 2, tile, overlap), nearest(x), atol=1e-6, rtol=0)


def test_blending_leaves_no_seams():
    """A model with a global term (like RG-SA) gives each tile its own offset. Hard-cut tiles would jump by the
    offset difference at every border; blended ones change by at most ~pi / (2 ramp) of it per pixel."""

    def global_offset(x):
        return nearest(x) + x.mean(dim=(-2, -1), keepdim=True)

    x = torch.linspace(0, 1, 96).expand(1, 1, 32, 96).contiguous()  # tile means differ by ~0.3
    out = tiled_forward(global_offset, x, 2, 32, 8)  # ramps of 16 output px
    jumps = (out[..., 1:] - out[..., :-1]).abs().max()
    natural = (nearest(x)[..., 1:] - nearest(x)[..., :-1]).abs().max()  # 1/95 every other column
    offsets = [x[..., s : s + 32].mean() for s in tile_starts(96, 32, 8)]
    step = max(abs(a - b) for a, b in zip(offsets, offsets[1:], strict=False))
    assert step > 0.2
    assert jumps < natural + 0.12 * step  # sin^2 slope <= pi / 32 per px over a 16-px ramp


def test_rgt_tiled_close_to_whole(tiny):
    """RG-SA is global, so tiles change the output a little. Tiny random model, 40x56, tile 32, overlap 8."""
    x = torch.rand(3, 40, 56, generator=gen("tiled-vs-whole"))
    whole = rgt.Upscaler(tiny, device="cpu").upscale(x)[0]
    tiled = rgt.Upscaler(tiny, device="cpu", tile=32, tile_overlap=8).upscale(x)[0]
    assert tiled.shape == whole.shape == (3, 80, 112)
    assert not torch.equal(tiled, whole)
    assert psnr_torch(tiled, whole, crop_border=0, y_channel=False).item() > 40  # measured: 52.1 dB


@pytest.mark.parametrize("hw,expected", [((20, 24), (20, 24)), ((5, 7), (16, 16)), ((16, 1100), (64, 1100)),
                                         ((1030, 40), (1030, 64)), ((1, 30), (16, 30))])
def test_valid_size(hw, expected):
    assert valid_size(*hw) == expected


def test_small_images_are_reflect_padded(tiny):
    x = torch.rand(1, 3, 5, 9, generator=gen("pad"))
    padded, (h, w) = pad_to_valid(x)
    assert padded.shape[-2:] == (16, 16) and (h, w) == (5, 9)
    assert torch.equal(padded[..., :5, :9], x) and torch.equal(padded[..., 5, :9], x[..., 3, :])  # reflection
    y = rgt.Upscaler(tiny, device="cpu").upscale(x)[0]
    with torch.no_grad():
        expected = tiny(padded)[..., :10, :18].clamp(0, 1)
    assert y.shape == (1, 3, 10, 18)
    torch.testing.assert_close(y, expected, atol=0, rtol=0)
    assert pad_to_valid(torch.rand(1, 1, 1, 3))[0].shape[-2:] == (16, 16)  # 1-px sides replicate


def _oom_above(model, limit):
    def call(x):
        if max(x.shape[-2:]) > limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return model(x)

    return call


def test_oom_falls_back_to_halved_tiles(tiny, caplog):
    up = rgt.Upscaler(tiny, device="cpu")
    up._net = _oom_above(tiny, 24)
    x = torch.rand(3, 20, 40, generator=gen("oom"))
    with caplog.at_level(logging.WARNING, logger="rgt.upscale"):
        y = up.upscale(x)[0]
    assert "out of memory on a 20x40 input with the whole image; retrying with 20 px tiles" in caplog.text
    assert up.tile == 20  # kept for the next images
    with torch.no_grad():
        expected = tiled_forward(tiny, x[None], 2, 20, 5)[0].clamp(0, 1)  # overlap 32 shrinks to tile // 4
    torch.testing.assert_close(y, expected, atol=1e-6, rtol=0)
    up.tile, up._net = 0, _oom_above(tiny, 8)  # nothing fits: the error surfaces after the smallest tile
    with pytest.raises(torch.cuda.OutOfMemoryError):
        up.upscale(x)


def test_cpu_allocator_oom_falls_back_to_tiles(tiny, caplog):
    """The CPU allocator's error (a plain RuntimeError) falls back to tiles like CUDA's; other errors do not."""
    def oom_above(x):
        if max(x.shape[-2:]) > 24:
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate "
                               "memory: you tried to allocate 51336000000 bytes. Error code 12")
        return tiny(x)

    up = rgt.Upscaler(tiny, device="cpu")
    up._net = oom_above
    x = torch.rand(3, 20, 40, generator=gen("cpu-oom"))
    with caplog.at_level(logging.WARNING, logger="rgt.upscale"):
        y = up.upscale(x)[0]
    assert "CPU out of memory on a 20x40 input with the whole image; retrying with 20 px tiles" in caplog.text
    with torch.no_grad():
        torch.testing.assert_close(y, tiled_forward(tiny, x[None], 2, 20, 5)[0].clamp(0, 1), atol=1e-6, rtol=0)
    up.tile, up._net = 0, lambda x: torch.ones(2, 3).matmul(torch.ones(2, 3))  # a bug, not memory: no retry
    with pytest.raises(RuntimeError, match="cannot be multiplied"):
        up.upscale(x)
    assert up.tile == 0


def test_reduced_precision_nan_falls_back_to_fp32(tiny, caplog):
    up = rgt.Upscaler(tiny, device="cpu", precision="bf16")
    assert rgt.Upscaler(tiny, device="cpu").precision == "fp32"  # auto on CPU

    def overflow_in_autocast(x):
        y = tiny(x)
        return torch.full_like(y, float("nan")) if torch.is_autocast_enabled("cpu") else y

    up._net = overflow_in_autocast
    x = torch.rand(3, 20, 24, generator=gen("nan"))
    with caplog.at_level(logging.WARNING, logger="rgt.upscale"):
        y = up.upscale(x)[0]
    assert "bf16 inference gave NaN/Inf; redoing it in fp32" in caplog.text and up.precision == "fp32"
    with torch.no_grad():
        torch.testing.assert_close(y, tiny(x[None])[0].clamp(0, 1), atol=0, rtol=0)
