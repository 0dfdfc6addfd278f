"""MATLAB-exact bicubic: rgt.data.imresize, bicubic_degrade and modcrop against real MATLAB R2017b files.

Measured on baboon (480x492x3), pixels differing from MATLAB after rounding to uint8:
- float64: 0 for down x2, x3, x4 and up x2 (up x2 has 181 exact .5 ties, all rounded as MATLAB does);
- float32: down x2 3 pixels, x3 0, x4 0, up x2 61 pixels, each off by 1 (float32 rounding of ~1e-7 moves
  values that sit within that distance of a .5 boundary).
"""

import math

import numpy as np
import pytest
import torch
from _utils import MATLAB_DATA, gen
from PIL import Image

from rgt.data import bicubic_degrade, imresize, modcrop, quantize_uint8

MATLAB = MATLAB_DATA
CASES = {"down_x2": 1 / 2, "down_x3": 1 / 3, "down_x4": 1 / 4, "up_x2": 2.0}


def _png(name: str) -> np.ndarray:
    return np.asarray(Image.open(MATLAB / name))


@pytest.fixture(scope="module")
def baboon() -> torch.Tensor:
    """(3, 480, 492) uint8"""
    return torch.from_numpy(_png("baboon.png").copy()).permute(2, 0, 1).contiguous()


def _diff_vs_matlab(out: torch.Tensor, case: str) -> np.ndarray:
    """|uint8(out) - MATLAB| per value, out (3, H, W) in [0, 1]."""
    ours = quantize_uint8(out).permute(1, 2, 0).numpy().astype(int)
    ref = _png(f"baboon_{case}_matlab.png").astype(int)
    assert ours.shape == ref.shape
    return np.abs(ours - ref)


@pytest.mark.parametrize("case", CASES)
def test_matlab_exact_float64(baboon, case):
    diff = _diff_vs_matlab(imresize(baboon.double() / 255, CASES[case]), case)
    assert diff.max() == 0, f"{(diff > 0).sum()} values differ from MATLAB"


@pytest.mark.parametrize("case", CASES)
def test_float32_within_one_lsb(baboon, case):
    out = imresize(baboon.float() / 255, CASES[case])
    assert out.dtype == torch.float32
    diff = _diff_vs_matlab(out, case)
    assert diff.max() <= 1
    assert (diff > 0).mean() < 1e-4  # measured at most 61 / 2.8M = 2.2e-5 (up x2)


def test_bicubic_degrade_uint8_is_matlab_exact(baboon):
    for s in (2, 3, 4):  # 480x492 is a multiple of 2, 3 and 4: these are exactly MATLAB's inputs
        lr = bicubic_degrade(baboon, s)
        assert lr.dtype == torch.uint8
        assert torch.equal(lr.permute(1, 2, 0), torch.from_numpy(_png(f"baboon_down_x{s}_matlab.png").copy()))


def test_bicubic_degrade_float(baboon):
    hr = baboon.float() / 255
    lr = bicubic_degrade(hr, 4)
    assert lr.dtype == torch.float32 and lr.shape == (3, 120, 123)
    assert torch.equal(torch.round(lr * 255), bicubic_degrade(baboon, 4).float())  # on the k/255 grid
    raw = bicubic_degrade(hr.double(), 4, quantize=False)
    assert torch.equal(raw, imresize(hr.double(), 1 / 4))


def test_bicubic_degrade_takes_images_as_they_come(baboon):
    """numpy (H, W, C) / (H, W) uint8 or float in [0, 1] give the tensor path's result in their own layout."""
    expected = bicubic_degrade(baboon, 4)
    hwc = baboon.permute(1, 2, 0).numpy()
    lr = bicubic_degrade(hwc, 4)
    assert isinstance(lr, np.ndarray) and lr.dtype == np.uint8 and lr.shape == (120, 123, 3)
    assert np.array_equal(lr, expected.permute(1, 2, 0).numpy())
    assert np.array_equal(bicubic_degrade(hwc[..., 0], 4), expected[0].numpy())  # gray (H, W)
    lr_float = bicubic_degrade(hwc.astype(np.float32) / 255, 4)
    assert lr_float.dtype == np.float32 and np.array_equal(np.round(lr_float * 255), lr.astype(np.float32))
    assert torch.equal(bicubic_degrade(baboon[None], 4)[0], expected)  # (B, C, H, W)
    with pytest.raises(ValueError, match=r"shape \(256, 256, 3\) looks like \(H, W, C\): pass t.permute"):
        bicubic_degrade(torch.zeros(256, 256, 3, dtype=torch.uint8), 2)
    with pytest.raises(ValueError, match=r"float hr must hold values in \[0, 1\], got \[6, 245\]: divide 0..255"):
        bicubic_degrade(baboon.float(), 2)


def test_bicubic_degrade_is_differentiable_without_quantize():
    hr = torch.rand(1, 3, 8, 12, generator=gen("degrade-grad"), dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: bicubic_degrade(x, 2, quantize=False), (hr,), fast_mode=True)


def test_shapes_layouts_and_batch():
    x = torch.rand(2, 3, 17, 23, generator=gen("layouts"), dtype=torch.float64)
    for scale in (1 / 3, 1 / 2, 2.0, 3.0):
        out = imresize(x, scale)
        assert out.shape == (2, 3, math.ceil(17 * scale), math.ceil(23 * scale))
        assert torch.equal(out[1], imresize(x[1], scale))  # (C, H, W)
        assert torch.equal(out[1, 2], imresize(x[1, 2], scale))  # (H, W)
        hwc = imresize(x[1].permute(1, 2, 0).numpy(), scale)  # numpy (H, W, C)
        assert isinstance(hwc, np.ndarray) and np.array_equal(hwc, out[1].permute(1, 2, 0).numpy())


def test_non_contiguous_input():
    x = torch.rand(3, 20, 14, generator=gen("non-contiguous"), dtype=torch.float64)
    xt = x.transpose(-1, -2)  # (3, 14, 20), not contiguous
    assert torch.equal(imresize(xt, 1 / 2), imresize(xt.contiguous(), 1 / 2))


def test_constant_image_is_preserved():
    # Weights are normalised per output pixel, mirrored borders included: a flat image stays flat.
    x = torch.full((1, 9, 13), 0.3, dtype=torch.float64)
    for scale in (1 / 4, 1 / 3, 2.0, 0.7):
        torch.testing.assert_close(imresize(x, scale), torch.full_like(imresize(x, scale), 0.3))


def test_antialias_off_matches_plain_cubic_interior():
    # Without antialiasing, downscaling by 2 samples the a=-0.5 cubic at distances 0.5 and 1.5.
    x = torch.rand(1, 1, 16, 16, generator=gen("no-aa"), dtype=torch.float64)
    out = imresize(x, 1 / 2, antialias=False)
    k = torch.tensor([-0.0625, 0.5625, 0.5625, -0.0625], dtype=torch.float64)  # cubic(1.5), cubic(0.5)
    rows = k @ x[0, 0, 3:7, :]  # output row 2 is centred at input row 4.5 (0-based): rows 3..6
    torch.testing.assert_close(out[0, 0, 2, 2], rows[3:7] @ k)


def test_gradcheck():
    x = torch.rand(1, 2, 7, 6, generator=gen("gradcheck"), dtype=torch.float64, requires_grad=True)
    for scale in (1 / 2, 1 / 3, 2.0):
        assert torch.autograd.gradcheck(lambda t, s=scale: imresize(t, s), (x,), fast_mode=True)


def test_errors():
    with pytest.raises(TypeError, match="float32 or float64"):
        imresize(torch.zeros(4, 4, dtype=torch.uint8), 0.5)
    with pytest.raises(TypeError, match="float32 or float64"):
        imresize(torch.zeros(4, 4, dtype=torch.float16), 0.5)
    with pytest.raises(ValueError, match="positive finite"):
        imresize(torch.zeros(4, 4), 0.0)
    with pytest.raises(ValueError, match=r"\(\.\.\., H, W\)"):
        imresize(torch.zeros(4), 0.5)
    with pytest.raises(ValueError, match="non-empty"):
        imresize(torch.zeros(3, 0, 4), 0.5)
    with pytest.raises(ValueError, match="hr size 10x9 \\(H x W\\) must be a multiple of scale 3: modcrop first"):
        bicubic_degrade(torch.zeros(3, 10, 9), 3)
    with pytest.raises(ValueError, match="positive int"):
        bicubic_degrade(torch.zeros(3, 8, 8), 2.0)
    with pytest.raises(TypeError, match="uint8 or float"):
        bicubic_degrade(torch.zeros(3, 8, 8, dtype=torch.int32), 2)


def test_modcrop():
    t = torch.arange(2 * 3 * 10 * 13).view(2, 3, 10, 13)
    assert torch.equal(modcrop(t, 4), t[..., :8, :12])  # top-left kept
    a = np.zeros((10, 13, 3))
    assert modcrop(a, 3).shape == (9, 12, 3)
    assert modcrop(a[:, :, 0], 5).shape == (10, 10)
    with pytest.raises(ValueError, match="smaller than the scale"):
        modcrop(torch.zeros(3, 3, 5), 4)
    with pytest.raises(ValueError, match="positive int"):
        modcrop(a, 0)


@pytest.mark.gpu
def test_cuda_matches_cpu_bitwise(baboon):
    for scale in CASES.values():
        x = baboon.double()[None] / 255
        assert torch.equal(imresize(x.cuda(), scale).cpu(), imresize(x, scale))
    assert torch.equal(bicubic_degrade(baboon.cuda(), 4).cpu(), bicubic_degrade(baboon, 4))
