"""`python -m rgt.upscale` end to end and the `rgt.Upscaler` API, on a tiny checkpoint and 20x24 images."""

import logging

import numpy as np
import pytest
import torch
from _utils import gen
from PIL import Image

import rgt
from rgt.data import read_image, write_image
from rgt.upscale import main

H, W = 20, 24


@pytest.fixture(scope="module")
def ckpt(tiny, tmp_path_factory):
    return rgt.save_checkpoint(tiny, tmp_path_factory.mktemp("ckpt") / "net_g_1000.pth")


def sr_of(model, x):
    """The expected output: the model on a (C, H, W) image, clamped."""
    with torch.no_grad():
        return model(x[None])[0].clamp(0, 1)


@pytest.fixture
def inputs(tmp_path):
    d = tmp_path / "in"
    g = gen("upscale-inputs")
    write_image(d / "rgb.png", torch.rand(3, H, W, generator=g))
    write_image(d / "rgb16.png", torch.rand(3, H, W, generator=g), bit_depth=16)
    write_image(d / "rgba.png", torch.rand(3, H, W, generator=g), alpha=torch.rand(1, H, W, generator=g))
    write_image(d / "gray.png", torch.rand(1, H, W, generator=g))
    write_image(d / "gray16.png", torch.rand(1, H, W, generator=g), bit_depth=16)
    write_image(d / "photo.jpg", torch.rand(3, H, W, generator=g))
    return d


def run(*args):
    return main([*map(str, args), "--kernels", "reference", "--device", "cpu"])


def test_cli_folder_round_trips(inputs, ckpt, tiny, tmp_path):
    out = tmp_path / "out"
    assert run("-i", inputs, "-o", out, "-m", ckpt) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in inputs.iterdir())
    for src in inputs.iterdir():
        a, b = read_image(src), read_image(out / src.name)
        assert b.image.shape == (a.image.shape[0], 2 * H, 2 * W), src.name  # gray stays gray
        assert b.bit_depth == a.bit_depth and (b.alpha is None) == (a.alpha is None), src.name
    rgb = read_image(out / "rgb.png").image
    torch.testing.assert_close(rgb, torch.round(sr_of(tiny, read_image(inputs / "rgb.png").image) * 255) / 255)
    deep = read_image(out / "rgb16.png").image * 65535
    assert (torch.round(deep) % 257 != 0).any()  # really 16-bit, not 8-bit values widened
    gray_in = read_image(inputs / "gray.png").image
    expected_gray = sr_of(tiny, gray_in.expand(3, -1, -1)).mean(0, keepdim=True)  # R = G = B, averaged back
    torch.testing.assert_close(read_image(out / "gray.png").image, torch.round(expected_gray * 255) / 255,
                               atol=1 / 255, rtol=0)
    alpha_in, alpha_out = read_image(inputs / "rgba.png").alpha, read_image(out / "rgba.png").alpha
    expected_alpha = rgt.data.imresize(alpha_in, 2).clamp(0, 1)  # bicubic
    torch.testing.assert_close(alpha_out, torch.round(expected_alpha * 255) / 255, atol=1 / 255, rtol=0)


def test_cli_single_file_ext_suffix_skip_overwrite(inputs, ckpt, tmp_path, caplog):
    target = tmp_path / "single.webp"
    assert run("-i", inputs / "rgb.png", "-o", target, "-m", ckpt) == 0
    assert Image.open(target).size == (2 * W, 2 * H)
    out = tmp_path / "out"
    assert run("-i", str(inputs / "rgb*.png"), "-o", out, "-m", ckpt, "--suffix", "_x2", "--ext", "jpg") == 0
    assert sorted(p.name for p in out.iterdir()) == ["rgb16_x2.jpg", "rgb_x2.jpg", "rgba_x2.jpg"]
    assert read_image(out / "rgba_x2.jpg").alpha is None  # JPEG has no alpha: dropped with a warning
    stamp = (out / "rgb_x2.jpg").stat().st_mtime_ns
    with caplog.at_level(logging.INFO, logger="rgt.upscale"):
        assert run("-i", inputs / "rgb.png", "-o", out, "-m", ckpt, "--suffix", "_x2", "--ext", "jpg") == 0
    assert "skipping 1 existing output" in caplog.text and (out / "rgb_x2.jpg").stat().st_mtime_ns == stamp
    assert run("-i", inputs / "rgb.png", "-o", out, "-m", ckpt, "--suffix", "_x2", "-f", "jpg", "--overwrite") == 0
    assert (out / "rgb_x2.jpg").stat().st_mtime_ns != stamp


def test_cli_corrupt_input_is_reported_and_skipped(inputs, ckpt, tmp_path, caplog):
    bad = inputs / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO, logger="rgt.upscale"):
        assert run("-i", inputs, "-o", out, "-m", ckpt, "--scale", "2") == 1
    assert str(bad) in caplog.text and "1 of 7 input(s) failed" in caplog.text
    assert len(list(out.iterdir())) == 6 and not (out / "broken.png").exists()


def test_cli_bad_arguments(inputs, ckpt, tmp_path, capsys):
    with pytest.raises(SystemExit):
        run("-i", inputs, "-o", tmp_path / "one.png", "-m", ckpt)
    assert "is a file name but there are 6 inputs" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run("-i", inputs, "-o", inputs, "-m", ckpt)
    assert "would overwrite its input" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run("-i", tmp_path / "nothing*.png", "-o", tmp_path, "-m", ckpt)
    assert "no images" in capsys.readouterr().err
    with pytest.raises(ValueError, match="x2 model"):
        run("-i", inputs / "rgb.png", "-o", tmp_path / "x.png", "-m", ckpt, "--scale", "4")


def test_torchrun_ranks_share_the_inputs(inputs, ckpt, tmp_path, monkeypatch):
    out = tmp_path / "out"
    names = sorted(p.name for p in inputs.iterdir())
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert run("-i", inputs, "-o", out, "-m", ckpt) == 0
    assert sorted(p.name for p in out.iterdir()) == names[0::2]
    monkeypatch.setenv("RANK", "1")
    assert run("-i", inputs, "-o", out, "-m", ckpt) == 0
    assert sorted(p.name for p in out.iterdir()) == names


def test_tta_is_the_mean_of_the_8_transforms(tiny):
    x = torch.rand(3, H, W, generator=gen("tta"))
    outputs = []
    for flip in (False, True):
        for k in range(4):
            t = torch.rot90(x, k, dims=(1, 2))
            t = t.flip(2) if flip else t
            y = _raw(tiny, t)
            y = y.flip(2) if flip else y
            outputs.append(torch.rot90(y, -k, dims=(1, 2)))
    assert len({tuple(o.flatten()[:5].tolist()) for o in outputs}) == 8  # eight different predictions
    expected = torch.stack(outputs).mean(0).clamp(0, 1)
    got = rgt.Upscaler(tiny, device="cpu", tta=True).upscale(x)[0]
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def _raw(model, x):
    with torch.no_grad():
        return model(x[None])[0]


def test_api_returns_the_kind_it_was_given(tiny):
    up = rgt.Upscaler(tiny, device="cpu")
    g = gen("api")
    rgb = (torch.rand(H, W, 3, generator=g) * 255).round().to(torch.uint8).numpy()
    out = up(rgb)
    assert out.dtype == np.uint8 and out.shape == (2 * H, 2 * W, 3)
    expected = torch.round(sr_of(tiny, torch.from_numpy(rgb).permute(2, 0, 1).float() / 255) * 255)
    assert np.array_equal(out, expected.permute(1, 2, 0).to(torch.uint8).numpy())
    gray16 = (torch.rand(H, W, generator=g) * 65535).to(torch.int32).numpy().astype(np.uint16)
    assert up(gray16).dtype == np.uint16 and up(gray16).shape == (2 * H, 2 * W)
    rgba = torch.rand(H, W, 4, generator=g).numpy()
    assert up(rgba).dtype == np.float32 and up(rgba).shape == (2 * H, 2 * W, 4)
    for mode in ("RGB", "RGBA", "L", "LA"):
        im = up(Image.fromarray(rgb).convert(mode))
        assert im.mode == mode and im.size == (2 * W, 2 * H)
    batch = torch.rand(2, 3, H, W, generator=g)
    out = up(batch)
    assert out.shape == (2, 3, 2 * H, 2 * W)
    torch.testing.assert_close(out[1], sr_of(tiny, batch[1]), atol=1e-6, rtol=0)
    assert up(torch.zeros(4, H, W, dtype=torch.uint8)).dtype == torch.uint8
    model_alpha = rgt.Upscaler(tiny, device="cpu", alpha="model")(rgba)
    assert model_alpha.shape == (2 * H, 2 * W, 4) and not np.allclose(model_alpha[..., 3], up(rgba)[..., 3])
    with pytest.raises(TypeError, match="numpy array, a PIL image or a tensor"):
        up([[0.5]])
