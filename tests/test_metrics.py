"""rgt.metrics: BasicSR's PSNR/SSIM protocol, checked against published numbers and independent oracles.

End-to-end figures (printed by test_end_to_end_baboon_x4, run with -s to see them); published values from
BasicSR's metrics README for this experiment (MATLAB LR x4 of baboon, MATLAB-bicubic x4 up, crop 4):
    RGB PSNR 20.419710 dB (published 20.419710), SSIM 0.391853 (0.391853)
    Y   PSNR 22.441899 dB (published 22.441898), SSIM 0.453098 (0.453097)
The Y values differ by ~1e-6: BasicSR rounds Y through float32, rgt keeps float64.
"""

import math

import numpy as np
import pytest
import torch
from _utils import MATLAB_DATA, gen
from PIL import Image

from rgt.data import imresize, modcrop, quantize_uint8
from rgt.metrics import psnr, psnr_torch, ssim, ssim_torch

MATLAB = MATLAB_DATA
PUBLISHED = {False: (20.419710, 0.391853), True: (22.441898, 0.453097)}  # y_channel -> (PSNR, SSIM)


def _hwc(t: torch.Tensor) -> np.ndarray:
    return t.permute(1, 2, 0).numpy()


@pytest.fixture(scope="module")
def baboon_x4():
    """(SR, HR) uint8 (H, W, 3): MATLAB LR x4 upscaled with our bicubic, and the modcropped HR."""
    lr = torch.from_numpy(np.array(Image.open(MATLAB / "baboon_down_x4_matlab.png"))).permute(2, 0, 1)
    sr = _hwc(quantize_uint8(imresize(lr.double() / 255, 4)))
    hr = modcrop(np.array(Image.open(MATLAB / "baboon.png")), 4)
    assert sr.shape == hr.shape == (480, 492, 3)
    return sr, hr


@pytest.mark.parametrize("y_channel", [False, True], ids=["rgb", "y"])
def test_end_to_end_baboon_x4(baboon_x4, y_channel):
    sr, hr = baboon_x4
    p, s = psnr(sr, hr, 4, y_channel=y_channel), ssim(sr, hr, 4, y_channel=y_channel)
    ref_p, ref_s = PUBLISHED[y_channel]
    print(
        f"baboon x4 bicubic {'Y' if y_channel else 'RGB'}: PSNR {p:.6f} dB (published {ref_p:.6f}), "
        f"SSIM {s:.6f} (published {ref_s:.6f})"
    )
    assert abs(p - ref_p) < 1e-3
    assert abs(s - ref_s) < 5e-4
    # The batched torch path, from [0, 1] floats as a model would output them.
    st, ht = (torch.from_numpy(a).permute(2, 0, 1).float() / 255 for a in (sr, hr))
    assert abs(psnr_torch(st[None], ht[None], 4, y_channel).item() - p) < 1e-6
    assert abs(ssim_torch(st[None], ht[None], 4, y_channel).item() - s) < 1e-9


def _random_pair(case: str, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """hr uniform in [0, 1]; sr = hr + noise, partly outside [0, 1] and off the uint8 grid."""
    g = gen(case)
    hr = torch.rand(shape, generator=g)
    return hr + 0.05 * torch.randn(shape, generator=g), hr


@pytest.mark.parametrize("channels,y_channel", [(3, True), (3, False), (1, True), (1, False)])
@pytest.mark.parametrize("crop", [0, 2, 4])
def test_torch_matches_numpy(channels, y_channel, crop):
    sr, hr = _random_pair(f"agree-{channels}-{y_channel}-{crop}", (3, channels, 29, 34))
    p, s = psnr_torch(sr, hr, crop, y_channel), ssim_torch(sr, hr, crop, y_channel)
    assert p.shape == s.shape == (3,) and p.dtype == s.dtype == torch.float64
    for i in range(3):
        # The numpy path takes what BasicSR's tensor2img makes of the model output: rounded uint8.
        a, b = (_hwc(quantize_uint8(x[i])) for x in (sr, hr))
        a, b = (x[..., 0] if channels == 1 else x for x in (a, b))  # gray as (H, W)
        assert abs(p[i].item() - psnr(a, b, crop, y_channel)) < 1e-6
        assert abs(s[i].item() - ssim(a, b, crop, y_channel)) < 1e-9


def test_torch_quantizes_like_tensor2img():
    sr, hr = _random_pair("quantize", (1, 3, 20, 20))
    rounded = torch.round(sr.clamp(0, 1) * 255).to(torch.uint8)
    assert torch.equal(psnr_torch(sr, hr, 0), psnr_torch(rounded, hr, 0))  # uint8 input is used as is
    assert psnr_torch(sr, hr, 0, quantize=False) != psnr_torch(sr, hr, 0)
    assert psnr_torch(sr[0], hr[0], 0).shape == ()  # unbatched -> scalar


def test_psnr_known_values():
    hr = np.random.default_rng(0).integers(20, 200, (16, 18, 3)).astype(np.uint8)
    sr = hr + 1  # every value off by exactly 1: MSE 1
    assert psnr(sr, hr, 0, y_channel=False) == pytest.approx(20 * math.log10(255), abs=1e-12)
    # Y differs by (65.481 + 128.553 + 24.966) / 255 = 219 / 255 everywhere: limited-range BT.601.
    assert psnr(sr, hr, 2, y_channel=True) == pytest.approx(20 * math.log10(255 / (219 / 255)), abs=1e-9)
    assert psnr(hr, hr, 0) == math.inf
    assert ssim(hr, hr, 0) == pytest.approx(1.0, abs=1e-12)
    assert torch.isinf(psnr_torch(torch.zeros(3, 8, 8), torch.zeros(3, 8, 8), 0))


def test_crop_border_is_applied():
    hr = np.full((20, 20), 100, np.uint8)
    sr = hr.copy()
    sr[:3, :] = 0  # damage only the top 3 rows
    assert psnr(sr, hr, 3) == math.inf
    assert psnr(sr, hr, 2) < 40


def test_ssim_against_direct_2d_window():
    """Independent oracle: the 11x11 outer-product window applied at every valid position with loops."""
    g = gen("ssim-direct")
    a = (torch.rand(24, 21, generator=g) * 255).double().numpy()
    b = np.clip(a + 20 * torch.randn(24, 21, generator=g).double().numpy(), 0, 255)
    k = np.exp(-((np.arange(11) - 5.0) ** 2) / (2 * 1.5**2))
    win = np.outer(k, k) / np.outer(k, k).sum()
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    vals = []
    for i in range(a.shape[0] - 10):
        for j in range(a.shape[1] - 10):
            pa, pb = a[i : i + 11, j : j + 11], b[i : i + 11, j : j + 11]
            ma, mb = (win * pa).sum(), (win * pb).sum()
            va, vb = (win * pa * pa).sum() - ma**2, (win * pb * pb).sum() - mb**2
            cov = (win * pa * pb).sum() - ma * mb
            vals.append((2 * ma * mb + c1) * (2 * cov + c2) / ((ma**2 + mb**2 + c1) * (va + vb + c2)))
    assert ssim(a, b, 0) == pytest.approx(np.mean(vals), abs=1e-12)
    unit = (torch.from_numpy(x / 255)[None] for x in (a, b))  # (1, H, W) in [0, 1]
    assert ssim_torch(*unit, 0, quantize=False).item() == pytest.approx(np.mean(vals), abs=1e-10)


def test_errors():
    x = np.zeros((16, 16, 3), np.uint8)
    with pytest.raises(ValueError, match="shapes differ"):
        psnr(x, x[:15], 0)
    with pytest.raises(ValueError, match="leaves nothing"):
        psnr(x, x, 8)
    with pytest.raises(ValueError, match="crop_border must be an int"):
        psnr(x, x, -1)
    with pytest.raises(ValueError, match="3 \\(RGB\\) or 1"):
        psnr(np.zeros((16, 16, 4)), np.zeros((16, 16, 4)), 0)
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(x, x, 3)
    with pytest.raises(TypeError, match="in \\[0, 255\\]"):
        psnr(x.astype(bool), x.astype(bool), 0)
    with pytest.raises(ValueError, match="tensor sr must be \\(C, H, W\\) or \\(B, C, H, W\\)"):
        psnr(torch.zeros(16, 16), torch.zeros(16, 16), 0)
    with pytest.raises(ValueError, match="tensor sr must be \\(C, H, W\\) or \\(B, C, H, W\\)"):
        psnr_torch(torch.zeros(16, 16), torch.zeros(16, 16), 0)
    with pytest.raises(TypeError, match="uint8 in \\[0, 255\\] or float"):
        ssim_torch(torch.zeros(3, 16, 16, dtype=torch.int64), torch.zeros(3, 16, 16, dtype=torch.int64), 0)


@pytest.mark.gpu
def test_cuda_matches_cpu():
    sr, hr = _random_pair("cuda-metrics", (2, 3, 40, 37))
    for fn in (psnr_torch, ssim_torch):
        torch.testing.assert_close(fn(sr.cuda(), hr.cuda(), 3).cpu(), fn(sr, hr, 3), rtol=0, atol=1e-10)


def test_layouts_users_pass_give_one_answer():
    """uint8 HWC (BasicSR), float [0, 1] HWC (skimage / numpy pipelines), tensors CHW and BCHW: the same dB."""
    sr, hr = _random_pair("layouts-metrics", (3, 40, 37))
    sr8, hr8 = (torch.round(x.clamp(0, 1) * 255).to(torch.uint8).permute(1, 2, 0).numpy() for x in (sr, hr))
    for fn in (psnr, ssim):
        ref = fn(sr8, hr8, 2)
        # measured differences: 0 (numpy paths), <= 1.2e-16 (torch path, same float64 formulas)
        assert fn(sr8 / 255.0, hr8 / 255.0, 2) == pytest.approx(ref, abs=1e-12)  # was 80.39 dB instead of 32.26
        assert fn(sr8.astype(np.float32) / 255, hr8, 2) == pytest.approx(ref, abs=1e-12)
        chw = [torch.from_numpy(x).permute(2, 0, 1) for x in (sr8, hr8)]
        assert fn(chw[0].float() / 255, chw[1].float() / 255, 2) == pytest.approx(ref, abs=1e-12)
        assert fn(chw[0].float() / 255, hr8, 2) == pytest.approx(ref, abs=1e-12)  # model output vs image file
        batch = fn(chw[0][None], chw[1][None], 2)
        assert batch.shape == (1,) and batch[0].item() == pytest.approx(ref, abs=1e-12)
    with pytest.raises(ValueError, match=r"shape \(40, 37, 3\) looks like \(H, W, C\): pass t.permute\(2, 0, 1\)"):
        psnr(torch.from_numpy(sr8), torch.from_numpy(hr8), 2)
    with pytest.raises(ValueError, match=r"shape \(3, 40, 37\) looks like \(C, H, W\)"):
        psnr(sr8.transpose(2, 0, 1), hr8.transpose(2, 0, 1), 2)
    with pytest.raises(ValueError, match=r"float sr must hold values in \[0, 1\].*divide 0..255"):
        psnr_torch(torch.from_numpy(sr8).permute(2, 0, 1).double(), torch.from_numpy(hr8).permute(2, 0, 1), 2)
