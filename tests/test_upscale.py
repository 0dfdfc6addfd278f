"""`python -m rgt.upscale` end to end and the `rgt.Upscaler` API, on a tiny checkpoint and 20x24 images."""

import logging
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from _utils import gen
from PIL import Image

import rgt
from rgt.data import read_image, write_image
from rgt.inference import tiled_forward
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
    with pytest.raises(SystemExit):  # even with --overwrite, an output never replaces its input
        run("-i", inputs / "rgb.png", "-o", inputs / "rgb.png", "-m", ckpt, "--overwrite")
    assert "would overwrite its input (even with --overwrite)" in capsys.readouterr().err


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


def _bad_checkpoints(ckpt, tmp_path):
    """(checkpoint, extra options, text the one error line must hold) for each way a model can be unusable."""
    empty, cut, other = tmp_path / "empty.pth", tmp_path / "cut.pth", tmp_path / "conv.pth"
    empty.touch()
    cut.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    torch.save({"params": torch.nn.Conv2d(3, 3, 3).state_dict()}, other)
    return [
        (tmp_path / "missing.pth", [], "missing.pth"),
        (empty, [], "empty.pth: empty file"),
        (cut, [], "cut.pth"),
        (other, [], "conv.pth: not an RGT checkpoint"),
        (ckpt, ["--scale", "4"], "x2 model"),
        (ckpt, ["--tile", "5"], "tile must be 0 (whole image) or >= 16 px, got 5"),
        (ckpt, ["--tile", "32", "--tile-overlap", "16"], "tile_overlap must be in [0, tile/2)"),
    ]


def test_cli_unusable_checkpoint_or_option_is_one_line(inputs, ckpt, tmp_path, caplog):
    for path, extra, text in _bad_checkpoints(ckpt, tmp_path):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="rgt.upscale"):
            assert run("-i", inputs / "rgb.png", "-o", tmp_path / "x.png", "-m", path, *extra) == 2, text
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1 and text in errors[0].getMessage(), (text, caplog.text)
        assert "\n" not in errors[0].getMessage() and errors[0].exc_info is None


def test_cli_tile_alone_gets_an_overlap_that_fits(inputs, ckpt, tiny, tmp_path):
    assert rgt.Upscaler(tiny, device="cpu", tile=64).overlap(64) == 16  # the README's tile 64: overlap 16
    assert run("-i", inputs / "rgb.png", "-o", tmp_path / "t.png", "-m", ckpt, "--tile", "16") == 0
    x = read_image(inputs / "rgb.png").image
    with torch.no_grad():
        expected = tiled_forward(tiny, x[None], 2, 16, 4)[0].clamp(0, 1)
    torch.testing.assert_close(read_image(tmp_path / "t.png").image, torch.round(expected * 255) / 255,
                               atol=0, rtol=0)  # the same ops in the same order: measured equal


def test_cli_progress_on_one_image_and_tta_in_the_start_line(inputs, ckpt, tmp_path, caplog, capsys):
    with caplog.at_level(logging.INFO, logger="rgt.upscale"):
        assert run("-i", inputs / "rgb.png", "-o", tmp_path / "t.png", "-m", ckpt, "--tta") == 0
    assert "TTA x8 (8 passes per image)" in caplog.text
    assert "/16 [" in capsys.readouterr().err  # 8 passes x 2 residual groups, ticked as they finish


def test_cli_failed_inputs_are_listed_on_their_own_lines(inputs, ckpt, tmp_path, caplog):
    for name in ("bad1.png", "bad2.png"):
        (inputs / name).write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with caplog.at_level(logging.INFO, logger="rgt.upscale"):
        assert run("-i", inputs, "-o", tmp_path / "out", "-m", ckpt) == 1
    messages = [r.getMessage() for r in caplog.records]
    at = messages.index("2 of 8 input(s) failed:")
    assert messages[at + 1].startswith(f"  cannot read image {inputs / 'bad1.png'}")
    assert messages[at + 2].startswith(f"  cannot read image {inputs / 'bad2.png'}")


def test_cli_rerun_in_place_skips_its_own_outputs(inputs, ckpt, caplog):
    args = ("-i", inputs, "-o", inputs, "-m", ckpt, "--suffix", "_x2")
    assert run(*args) == 0
    with caplog.at_level(logging.INFO, logger="rgt.upscale"):
        assert run(*args) == 0
    assert not list(inputs.glob("*_x2_x2.*")) and len(list(inputs.glob("*_x2.*"))) == 6
    assert "skipping 6 input(s) that are outputs of this command" in caplog.text


def test_cli_ctrl_c_is_one_line_and_status_130(inputs, ckpt, tmp_path, monkeypatch, caplog):
    done = []

    def interrupted(up, src, dst, quality):
        if done:
            raise KeyboardInterrupt
        done.append(dst)
        write_image(dst, torch.zeros(3, 4, 4))

    monkeypatch.setattr("rgt.upscale.upscale_file", interrupted)
    with caplog.at_level(logging.INFO, logger="rgt.upscale"):
        assert run("-i", inputs, "-o", tmp_path / "out", "-m", ckpt) == 130
    assert "interrupted: finished outputs are complete" in caplog.text
    assert [p.name for p in (tmp_path / "out").iterdir()] == [done[0].name]


def test_help_answers_without_torch_and_shows_defaults():
    code = ("import runpy, sys\nsys.argv = ['rgt.upscale', '--help']\ntry:\n    runpy.run_module('rgt.upscale', "
            "run_name='__main__')\nexcept SystemExit:\n    pass\nprint('torch' in sys.modules, "
            "'torch._inductor' in sys.modules)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # as in a user's shell
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout
    assert out.strip().endswith("False False") and "JPEG / WebP quality (default: 95)" in out
    out = subprocess.run([sys.executable, "-m", "rgt.evaluate", "--help"], capture_output=True, text=True,
                         check=True).stdout
    assert "(-o, default results/evaluate): metrics.json and metrics.md" in out


def test_api_refuses_or_flags_odd_input(tiny, caplog, tmp_path):
    up = rgt.Upscaler(tiny, device="cpu")
    g = gen("api-odd")
    with pytest.raises(ValueError, match=r"float image must hold values in \[0, 1\].*divide 0..255"):
        up(torch.rand(H, W, 3, generator=g).numpy() * 255)
    with pytest.raises(ValueError, match="no empty dimension"):
        up(torch.rand(0, 3, H, W))
    f = Image.fromarray(torch.rand(H, W, generator=g).numpy(), mode="F")
    out = up(f)  # float stays float: not squashed to 256 levels
    assert out.mode == "F" and out.size == (2 * W, 2 * H)
    assert not np.allclose(np.asarray(out) * 255, np.round(np.asarray(out) * 255), atol=1e-3)
    frames = [Image.new("RGB", (W, H), c) for c in ("red", "blue")]
    frames[0].save(tmp_path / "anim.png", save_all=True, append_images=frames[1:])
    with caplog.at_level(logging.WARNING, logger="rgt"):
        with Image.open(tmp_path / "anim.png") as im:
            assert up(im).size == (2 * W, 2 * H)
        assert read_image(tmp_path / "anim.png").image.shape == (3, H, W)
    assert "animated image with 2 frames: only frame 0 is upscaled" in caplog.text
    assert "anim.png is animated (2 frames): only the first frame is used" in caplog.text
