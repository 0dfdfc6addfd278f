"""`python -m rgt.evaluate` on two-image datasets made on the fly, checked against `rgt.metrics` by hand."""

import json
import logging
import shutil

import pytest
import torch
from _utils import gen

import rgt
from rgt.data import bicubic_degrade, imresize, modcrop, quantize_uint8, read_image, write_image
from rgt.data.prepare import main as prepare
from rgt.evaluate import Pair, best_crop, find_pairs, main
from rgt.metrics import psnr, ssim


@pytest.fixture(scope="module")
def ckpt(tiny, tmp_path_factory):
    return rgt.save_checkpoint(tiny, tmp_path_factory.mktemp("ckpt") / "tiny_x2.safetensors")


@pytest.fixture
def hr_only(tmp_path):
    root = tmp_path / "Set2"
    g = gen("evaluate-hr")
    write_image(root / "HR" / "alpha.png", torch.rand(3, 40, 48, generator=g))
    write_image(root / "HR" / "beta.png", torch.rand(3, 37, 50, generator=g))  # odd height: modcropped to 36
    return root


def by_hand(model, hr_path, scale=2):
    """PSNR / SSIM (model and bicubic) with the paper protocol, from the library's pieces."""
    hr = modcrop(torch.round(read_image(hr_path).image * 255).to(torch.uint8), scale)
    lr = bicubic_degrade(hr, scale)
    with torch.no_grad():
        sr = model(lr[None].float() / 255)[0]
    sr = torch.round(sr.clamp(0, 1) * 255).to(torch.uint8)
    bic = quantize_uint8(imresize(lr.double() / 255, scale))
    hwc = [x.permute(1, 2, 0).numpy() for x in (sr, bic, hr)]
    return dict(psnr=psnr(hwc[0], hwc[2], scale), ssim=ssim(hwc[0], hwc[2], scale),
                bicubic_psnr=psnr(hwc[1], hwc[2], scale), bicubic_ssim=ssim(hwc[1], hwc[2], scale)), sr


def run(ckpt, datasets, out, *extra):
    return main(["-m", str(ckpt), "-d", *map(str, datasets), "-o", str(out), "--kernels", "reference",
                 "--device", "cpu", *extra])


def test_hr_only_dataset_matches_metrics_by_hand(tiny, ckpt, hr_only, tmp_path, capsys):
    out = tmp_path / "report"
    assert run(ckpt, [hr_only], out, "--save-images", "--compare", "--csv", "--crop-size", "24") == 0
    report = json.loads((out / "metrics.json").read_text())
    rows = report["datasets"]["Set2"]["images"]
    assert [r["image"] for r in rows] == ["alpha", "beta"] and report["scale"] == 2
    for row in rows:
        expected, sr = by_hand(tiny, hr_only / "HR" / f"{row['image']}.png")
        for key, value in expected.items():
            assert row[key] == pytest.approx(value, abs=1e-9), (row["image"], key)
        saved = read_image(out / "Set2" / "SR" / f"{row['image']}.png").image
        assert torch.equal(torch.round(saved * 255).to(torch.uint8), sr)
        compare = read_image(out / "Set2" / "compare" / f"{row['image']}.png").image
        assert compare.shape == (3, 24, 3 * 24 + 2 * 4)  # bicubic | SR | HR with 4-px gaps
    average = report["datasets"]["Set2"]["average"]
    assert average["psnr"] == pytest.approx(sum(r["psnr"] for r in rows) / 2, abs=1e-12)
    printed = capsys.readouterr().out
    assert "| bicubic |" in printed and "| **average** |" in printed
    assert (out / "metrics.md").read_text().strip() == printed.strip()
    assert len((out / "metrics.csv").read_text().splitlines()) == 3


def test_basicsr_layouts_give_the_same_numbers(ckpt, hr_only, tmp_path):
    """LR_bicubic/X2/{name}x2.png (made by rgt.data.prepare) and Manga109's {name}_LRBI_x2.png naming."""
    prepare([str(hr_only / "HR"), str(hr_only), "--scales", "2", "--device", "cpu"])
    manga = tmp_path / "Manga2"
    shutil.copytree(hr_only / "HR", manga / "HR")
    lr_dir = manga / "LR_bicubic" / "X2"
    lr_dir.mkdir(parents=True)
    for name in ("alpha", "beta"):
        shutil.copy(hr_only / "LR_bicubic" / "X2" / f"{name}x2.png", lr_dir / f"{name}_LRBI_x2.png")
    assert [p.lr.name for p in find_pairs(manga, 2)] == ["alpha_LRBI_x2.png", "beta_LRBI_x2.png"]
    assert run(ckpt, [hr_only, manga], tmp_path / "paired") == 0
    shutil.rmtree(hr_only / "LR_bicubic")
    assert find_pairs(hr_only, 2)[0] == Pair("alpha", hr_only / "HR" / "alpha.png", None)
    assert run(ckpt, [hr_only / "HR"], tmp_path / "made", "--tta") == 0  # the HR folder names its dataset
    paired = json.loads((tmp_path / "paired" / "metrics.json").read_text())["datasets"]
    made = json.loads((tmp_path / "made" / "metrics.json").read_text())
    assert made["model"] == "RGT+ x2" and made["tta"] is True
    plain = [r["bicubic_psnr"] for r in paired["Set2"]["images"]]
    assert plain == [r["bicubic_psnr"] for r in paired["Manga2"]["images"]]
    assert plain == [r["bicubic_psnr"] for r in made["datasets"]["Set2"]["images"]]
    assert paired["Set2"]["average"]["psnr"] == paired["Manga2"]["average"]["psnr"]


def test_missing_lr_is_named(hr_only):
    (hr_only / "LR_bicubic" / "X2").mkdir(parents=True)
    write_image(hr_only / "LR_bicubic" / "X2" / "alphax2.png", torch.rand(3, 20, 24))
    with pytest.raises(FileNotFoundError, match="no LR image for beta"):
        find_pairs(hr_only, 2)


def test_best_crop_finds_where_sr_gains_most():
    g = gen("best-crop")
    hr = (torch.rand(3, 60, 80, generator=g) * 255).to(torch.uint8)
    bic = (hr.int() + torch.randint(-20, 21, hr.shape, generator=g)).clamp(0, 255).to(torch.uint8)
    sr = bic.clone()
    sr[:, 10:26, 30:46] = hr[:, 10:26, 30:46]  # SR is perfect there, bicubic-like elsewhere
    assert best_crop(sr, bic, hr, 16) == (10, 30, 16, 16)
    assert best_crop(sr, bic, hr, 500)[2:] == (60, 80)  # the crop is clipped to the image


def test_unreadable_image_is_reported_and_skipped(ckpt, hr_only, tmp_path, caplog):
    (hr_only / "HR" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    write_image(hr_only / "HR" / "dot.png", torch.rand(3, 1, 1))  # smaller than the scale
    out = tmp_path / "report"
    with caplog.at_level(logging.INFO, logger="rgt.evaluate"):
        assert run(ckpt, [hr_only], out) == 1
    report = json.loads((out / "metrics.json").read_text())
    assert [r["image"] for r in report["datasets"]["Set2"]["images"]] == ["alpha", "beta"]
    assert len(report["failed"]) == 2 and "broken.png" in report["failed"][0] and "dot.png" in report["failed"][1]
    assert "2 image(s) failed and are not in the averages" in caplog.text


def test_empty_folder_and_bad_checkpoint_are_one_line(ckpt, tmp_path, caplog):
    (tmp_path / "Empty" / "HR").mkdir(parents=True)
    (tmp_path / "zero.pth").touch()
    for ck, text in ((ckpt, "no HR images in"), (tmp_path / "zero.pth", "zero.pth: empty file")):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="rgt.evaluate"):
            assert run(ck, [tmp_path / "Empty"], tmp_path / "report") == 2
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1 and text in errors[0], caplog.text
