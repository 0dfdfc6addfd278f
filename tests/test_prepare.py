"""`python -m rgt.data.prepare`: LR folders with BasicSR naming, byte-for-byte MATLAB's bicubic LR files."""

import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from _utils import MATLAB_DATA, REPO, gen
from PIL import Image

from rgt.data import bicubic_degrade, modcrop, read_image, write_image
from rgt.data.prepare import main

MATLAB = MATLAB_DATA


@pytest.fixture
def hr_dir(tmp_path):
    d = tmp_path / "HR"
    d.mkdir()
    shutil.copy(MATLAB / "baboon.png", d / "baboon.png")  # 480x492: a multiple of 2, 3 and 4
    odd = torch.rand(3, 37, 50, generator=gen("prepare-odd"))
    write_image(d / "odd.png", odd, alpha=torch.ones(1, 37, 50))  # alpha is dropped
    (d / "notes.txt").write_text("not an image, ignored")
    return d


def test_matches_matlab_and_basicsr_naming(hr_dir, tmp_path):
    out = tmp_path / "out"
    main([str(hr_dir), str(out), "--scales", "2", "3", "4", "--device", "cpu"])
    for s in (2, 3, 4):
        folder = out / "LR_bicubic" / f"X{s}"
        assert sorted(p.name for p in folder.iterdir()) == [f"baboonx{s}.png", f"oddx{s}.png"]
        lr = np.asarray(Image.open(folder / f"baboonx{s}.png"))
        assert np.array_equal(lr, np.asarray(Image.open(MATLAB / f"baboon_down_x{s}_matlab.png")))
        odd_hr = torch.round(read_image(hr_dir / "odd.png").image * 255).to(torch.uint8)
        odd_lr = read_image(folder / f"oddx{s}.png")
        assert odd_lr.image.shape == (3, 37 // s, 50 // s) and odd_lr.alpha is None
        expected = bicubic_degrade(modcrop(odd_hr, s), s)
        assert torch.equal(torch.round(odd_lr.image * 255).to(torch.uint8), expected)


def test_resume_and_overwrite(hr_dir, tmp_path, caplog):
    out = tmp_path / "out"
    main([str(hr_dir), str(out), "--scales", "4"])
    target = out / "LR_bicubic" / "X4" / "oddx4.png"
    stamp = target.stat().st_mtime_ns
    with caplog.at_level("INFO", logger="rgt.data.prepare"):
        main([str(hr_dir), str(out), "--scales", "4"])
    assert "wrote 0 LR images" in caplog.text and target.stat().st_mtime_ns == stamp
    main([str(hr_dir), str(out), "--scales", "4", "--overwrite"])
    assert target.stat().st_mtime_ns != stamp


def test_bad_arguments(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main([str(tmp_path / "missing"), str(tmp_path / "out")])
    assert "is not a folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(tmp_path), str(tmp_path / "out"), "--scales", "0"])
    assert "positive integers" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="no images"):
        main([str(tmp_path), str(tmp_path / "out")])


def test_module_entry_point(tmp_path):
    (tmp_path / "HR").mkdir()
    write_image(tmp_path / "HR" / "small.png", torch.rand(3, 12, 12, generator=gen("prepare-cli")))
    cmd = [
        sys.executable,
        "-m",
        "rgt.data.prepare",
        str(tmp_path / "HR"),
        str(tmp_path / "out"),
        "--scales",
        "2",
    ]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "bicubic LR" in res.stderr  # the tqdm progress bar
    assert read_image(tmp_path / "out" / "LR_bicubic" / "X2" / "smallx2.png").image.shape == (3, 6, 6)
