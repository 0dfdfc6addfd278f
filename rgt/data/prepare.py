"""Make bicubic LR folders from a folder of HR images, like BasicSR's MATLAB script, but in Python.

    python -m rgt.data.prepare HR_DIR OUT_DIR --scales 2 3 4

writes OUT_DIR/LR_bicubic/X{s}/{name}x{s}.png for every image in HR_DIR (BasicSR's DIV2K/benchmark naming,
so `{name}x{s}` is the LR file template). Each HR image is modcropped to a multiple of s (top-left kept, the
crop BasicSR's validation applies to the GT) and downscaled with MATLAB-exact bicubic from its uint8 values,
so the files equal MATLAB's `imwrite(imresize(im2double(hr), 1/s, 'bicubic'))`. LR files are 8-bit PNG (a
16-bit HR is resized from its 16-bit values); alpha is dropped. Existing outputs are skipped unless
--overwrite, so an interrupted run resumes; writes are atomic.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm import tqdm

from rgt.data.degrade import bicubic_degrade, modcrop
from rgt.data.io import IMAGE_EXTENSIONS, read_image, write_image

log = logging.getLogger("rgt.data.prepare")


def lr_path(out_dir: Path, name: str, scale: int) -> Path:
    """OUT_DIR/LR_bicubic/X{s}/{name}x{s}.png"""
    return out_dir / "LR_bicubic" / f"X{scale}" / f"{name}x{scale}.png"


def _hr_tensor(path: Path, device: torch.device) -> torch.Tensor:
    """(C, H, W) uint8 for 8-bit files (bit-exact with MATLAB), float64 in [0, 1] for 16-bit ones."""
    loaded = read_image(path)
    if loaded.alpha is not None:
        log.info("%s: alpha channel dropped", path)
    if loaded.bit_depth == 8:
        return torch.round(loaded.image * 255).to(device=device, dtype=torch.uint8)
    return loaded.image.to(device=device, dtype=torch.float64)


def prepare(
    hr_dir: Path, out_dir: Path, scales: Sequence[int], *, device: str = "cpu", overwrite: bool = False
) -> int:
    """Write the LR folders; returns the number of files written."""
    files = sorted(p for p in hr_dir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {hr_dir}")
    written = 0
    for path in tqdm(files, desc="bicubic LR", unit="img"):
        todo = [s for s in scales if overwrite or not lr_path(out_dir, path.stem, s).exists()]
        if not todo:
            continue
        hr = _hr_tensor(path, torch.device(device))
        for s in todo:
            lr = bicubic_degrade(modcrop(hr, s), s)
            write_image(lr_path(out_dir, path.stem, s), lr)
            written += 1
    return written


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m rgt.data.prepare", description=__doc__.split("\n\n")[0])
    parser.add_argument("hr_dir", type=Path, help="folder of HR images")
    parser.add_argument("out_dir", type=Path, help="writes OUT_DIR/LR_bicubic/X{s}/{name}x{s}.png")
    parser.add_argument("--scales", type=int, nargs="+", default=[2, 3, 4], help="downscaling factors")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--overwrite", action="store_true", help="rewrite existing LR files")
    args = parser.parse_args(argv)
    if not args.hr_dir.is_dir():
        parser.error(f"HR_DIR {args.hr_dir} is not a folder")
    if any(s < 1 for s in args.scales):
        parser.error(f"scales must be positive integers, got {args.scales}")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    n = prepare(args.hr_dir, args.out_dir, args.scales, device=args.device, overwrite=args.overwrite)
    log.info("wrote %d LR images under %s", n, args.out_dir / "LR_bicubic")


if __name__ == "__main__":
    main()
