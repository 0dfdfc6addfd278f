"""PSNR / SSIM of an RGT checkpoint on folder datasets, with the paper's protocol and a bicubic baseline.

    python -m rgt.evaluate -m RGT_S_x4.pth -d datasets/benchmark/Set5 datasets/benchmark/Manga109 --compare

Dataset layouts (BasicSR's): DIR/HR (or DIR/GTmod12) with DIR/LR_bicubic/X{s} (or DIR/LRbicx{s}), LR files named
`{name}x{s}`, `{name}_LRBI_x{s}` (Manga109) or `{name}`; or HR images only (DIR/HR or DIR itself), in which
case the LR is made with the MATLAB-exact bicubic from the modcropped HR. The HR is cropped to s x the LR size
(top-left), as BasicSR does. Metrics: `rgt.metrics` (BasicSR-exact) on the uint8-rounded output, Y channel,
crop = scale; gray images count as R = G = B, as BasicSR's OpenCV loader reads them. Precision defaults to
fp32 here, so the numbers compare with the paper's.

Writes into OUTPUT (-o, default results/evaluate): metrics.json and metrics.md (and metrics.csv with --csv);
--save-images writes OUTPUT/{dataset}/SR/*.png and --compare OUTPUT/{dataset}/compare/*.png: the crop where
SR gains most over bicubic, as bicubic | SR | HR side by side. An image that cannot be read or is too small is
reported and left out of the averages, and the exit status is then 1; an unusable checkpoint, option or
dataset folder is one error line and status 2.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from rgt import _cli
from rgt.data.degrade import bicubic_degrade, modcrop, quantize_uint8
from rgt.data.io import IMAGE_EXTENSIONS, read_image, write_image
from rgt.data.resize import imresize
from rgt.detect import official_name
from rgt.inference.upscaler import Upscaler
from rgt.metrics import Y_COEFFS, psnr, ssim

log = logging.getLogger("rgt.evaluate")

HR_DIRS = ("HR", "GTmod12")
LR_DIRS = ("LR_bicubic/X{s}", "LRbicx{s}")
LR_NAMES = ("{name}x{s}", "{name}_LRBI_x{s}", "{name}")
GAP = 4  # white px between the panels of a comparison


@dataclass
class Pair:
    name: str
    hr: Path
    lr: Path | None  # None: made from the HR with bicubic_degrade


@dataclass
class Row:
    image: str
    psnr: float
    ssim: float
    bicubic_psnr: float
    bicubic_ssim: float
    seconds: float


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _find_lr(lr_files: dict[str, Path], name: str, scale: int) -> Path:
    for template in LR_NAMES:
        hit = lr_files.get(template.format(name=name, s=scale))
        if hit is not None:
            return hit
    tried = ", ".join(t.format(name=name, s=scale) for t in LR_NAMES)
    raise FileNotFoundError(f"no LR image for {name} in {next(iter(lr_files.values())).parent} (tried {tried})")


def find_pairs(root: Path, scale: int) -> list[Pair]:
    """HR/LR file pairs of a dataset folder in any of the layouts of the module docstring."""
    hr_dir = next((root / d for d in HR_DIRS if (root / d).is_dir()), root)
    hr_files = _images(hr_dir)
    if not hr_files:
        raise FileNotFoundError(f"no HR images in {hr_dir}")
    lr_dir = next((root / d.format(s=scale) for d in LR_DIRS if (root / d.format(s=scale)).is_dir()), None)
    if lr_dir is None:
        log.info("%s: no LR folder for x%d, making the LR with MATLAB bicubic", root, scale)
        return [Pair(p.stem, p, None) for p in hr_files]
    lr_files = {p.stem: p for p in _images(lr_dir)}
    if not lr_files:
        raise FileNotFoundError(f"no LR images in {lr_dir}")
    return [Pair(p.stem, p, _find_lr(lr_files, p.stem, scale)) for p in hr_files]


def _rgb_uint8(path: Path) -> Tensor:
    """(3, H, W) uint8; gray is replicated (BasicSR reads every image as 3-channel), alpha dropped."""
    image = read_image(path).image
    return torch.round(image.expand(3, -1, -1) * 255).to(torch.uint8)


def load_pair(pair: Pair, scale: int) -> tuple[Tensor, Tensor]:
    """(LR float32 (3, h, w) in [0, 1], HR uint8 (3, s h, s w)), the HR cropped to s x the LR."""
    hr = _rgb_uint8(pair.hr)
    if pair.lr is None:
        hr = modcrop(hr, scale)
        return bicubic_degrade(hr, scale).float() / 255, hr
    lr = _rgb_uint8(pair.lr)
    h, w = lr.shape[-2] * scale, lr.shape[-1] * scale
    if hr.shape[-2] < h or hr.shape[-1] < w:
        raise ValueError(f"HR {pair.hr} ({tuple(hr.shape[1:])}) is smaller than x{scale} its LR {pair.lr}")
    return lr.float() / 255, hr[:, :h, :w]


def _hwc(x: Tensor) -> np.ndarray:
    return x.permute(1, 2, 0).cpu().numpy()


def _y(x: Tensor) -> Tensor:
    """(3, H, W) uint8 -> (H, W) float64 BT.601 Y in [16, 235]."""
    r, g, b = x.double() / 255
    return 16 + Y_COEFFS[0] * r + Y_COEFFS[1] * g + Y_COEFFS[2] * b


def best_crop(sr: Tensor, bic: Tensor, hr: Tensor, size: int) -> tuple[int, int, int, int]:
    """(top, left, h, w) of the size x size window (clipped to the image) where SR's squared Y error is lowest
    relative to bicubic's, i.e. where SR gains most."""
    hr_y = _y(hr)
    gain = (_y(bic) - hr_y) ** 2 - (_y(sr) - hr_y) ** 2  # (H, W)
    h, w = min(size, gain.shape[0]), min(size, gain.shape[1])
    score = F.avg_pool2d(gain[None, None], (h, w), stride=1)[0, 0]  # mean gain of every window
    top, left = divmod(int(score.argmax()), score.shape[1])
    return top, left, h, w


def comparison(sr: Tensor, bic: Tensor, hr: Tensor, size: int) -> Tensor:
    """(3, h, 3 w + 2 GAP) uint8: bicubic | SR | HR crops of the region of `best_crop`."""
    top, left, h, w = best_crop(sr, bic, hr, size)
    crops = [x[:, top : top + h, left : left + w] for x in (bic, sr, hr)]
    gap = torch.full((3, h, GAP), 255, dtype=torch.uint8)
    return torch.cat([crops[0], gap, crops[1], gap, crops[2]], dim=2)


def _metrics(sr: Tensor, hr: Tensor, scale: int) -> tuple[float, float]:
    a, b = _hwc(sr), _hwc(hr)
    return psnr(a, b, crop_border=scale, y_channel=True), ssim(a, b, crop_border=scale, y_channel=True)


def evaluate_pair(up: Upscaler, pair: Pair, out_dir: Path | None, args: argparse.Namespace) -> Row:
    """Metrics of one image for the model and for bicubic; writes the SR / comparison images if asked."""
    s = up.scale
    lr, hr = load_pair(pair, s)
    start = time.perf_counter()
    sr_float, _ = up.upscale(lr)
    seconds = time.perf_counter() - start
    sr = torch.round(sr_float.clamp(0, 1) * 255).to(torch.uint8)  # BasicSR's tensor2img
    bic = quantize_uint8(imresize(lr.double(), s))  # MATLAB imresize(lr, s, 'bicubic') stored as uint8
    if out_dir is not None and args.save_images:
        write_image(out_dir / "SR" / f"{pair.name}.png", sr)
    if out_dir is not None and args.compare:
        write_image(out_dir / "compare" / f"{pair.name}.png", comparison(sr, bic, hr, args.crop_size))
    return Row(pair.name, *_metrics(sr, hr, s), *_metrics(bic, hr, s), seconds)


def average(rows: list[Row]) -> dict[str, float]:
    return {k: float(np.mean([getattr(r, k) for r in rows])) for k in ("psnr", "ssim", "bicubic_psnr",
                                                                       "bicubic_ssim", "seconds")}


def markdown(name: str, scale: int, label: str, rows: list[Row]) -> str:
    """Per-image table with the average, then the model vs bicubic summary."""
    avg = average(rows)
    lines = [f"## {name} x{scale}", "", "| image | PSNR | SSIM | bicubic PSNR | bicubic SSIM | time (s) |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in [*rows, Row("**average**", **avg)]:
        lines.append(f"| {r.image} | {r.psnr:.4f} | {r.ssim:.4f} | {r.bicubic_psnr:.4f} | {r.bicubic_ssim:.4f} "
                     f"| {r.seconds:.3f} |")
    lines += ["", "| method | PSNR (Y) | SSIM (Y) |", "|---|---:|---:|",
              f"| bicubic | {avg['bicubic_psnr']:.2f} | {avg['bicubic_ssim']:.4f} |",
              f"| {label} | {avg['psnr']:.2f} | {avg['ssim']:.4f} |", ""]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = _cli.parser("python -m rgt.evaluate", __doc__)
    _cli.add_model_options(p, precision="fp32", device="auto: the first GPU if any, else the CPU", tile_unit="LR")
    p.add_argument("-d", "--datasets", required=True, nargs="+", type=Path, help="dataset folders")
    p.add_argument("-o", "--output", type=Path, default=Path("results/evaluate"),
                   help="report folder: metrics.json, metrics.md (+ metrics.csv, {dataset}/SR, {dataset}/compare)")
    p.add_argument("--save-images", action="store_true", help="write the SR outputs as PNG")
    p.add_argument("--compare", action="store_true", help="write bicubic | SR | HR crops as PNG")
    p.add_argument("--crop-size", type=int, default=128, help="side of the comparison crops in HR px")
    p.add_argument("--csv", action="store_true", help="also write metrics.csv")
    return p


def write_reports(output: Path, meta: dict, results: dict[str, list[Row]], text: str, with_csv: bool) -> None:
    """OUTPUT/metrics.json (per image + averages), metrics.md (the printed tables), metrics.csv if asked."""
    output.mkdir(parents=True, exist_ok=True)
    report = dict(meta, datasets={name: {"images": [asdict(r) for r in rows], "average": average(rows)}
                                  for name, rows in results.items()})
    (output / "metrics.json").write_text(json.dumps(report, indent=2) + "\n")
    (output / "metrics.md").write_text(text)
    if with_csv:
        with open(output / "metrics.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["dataset", *Row.__dataclass_fields__])
            for name, rows in results.items():
                writer.writerows([name, *asdict(r).values()] for r in rows)


def evaluate_dataset(up: Upscaler, root: Path, args: argparse.Namespace) -> tuple[list[Row], list[str]]:
    """(rows of the images that worked, one line per image that did not)."""
    pairs = find_pairs(root, up.scale)
    out_dir = args.output / root.name if (args.save_images or args.compare) else None
    rows, failed = [], []
    for pair in tqdm(pairs, desc=root.name, unit="img", dynamic_ncols=True):
        try:
            rows.append(evaluate_pair(up, pair, out_dir, args))
        except (OSError, ValueError) as e:  # an unreadable or too small image: report it, keep going
            failed.append(f"{pair.hr}: {e}" if str(pair.hr) not in str(e) else str(e))
            tqdm.write(f"failed: {failed[-1]}")
    return rows, failed


def main(argv: Sequence[str] | None = None) -> int:
    """Returns the exit status: 0; 1 if an image failed; 2 for a bad checkpoint, option or folder; 130 on Ctrl-C."""
    parser = build_parser()
    args = parser.parse_args(argv)
    missing = [str(d) for d in args.datasets if not d.is_dir()]
    if missing:
        parser.error(f"not a folder: {', '.join(missing)}")
    args.datasets = [d.parent if d.name in HR_DIRS else d for d in args.datasets]  # DIR/HR given: use DIR
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        up = Upscaler(args.checkpoint, model=args.model, scale=args.scale, device=args.device,
                      precision=args.precision, tile=args.tile, tile_overlap=args.tile_overlap, tta=args.tta,
                      kernels=args.kernels)
    except (OSError, ValueError, TypeError, RuntimeError) as e:
        return _cli.fail(log, _cli.checkpoint_error(args.checkpoint, e))
    arch = (official_name(up.config) if up.config else None) or "RGT"
    label = f"{arch}{'+' if args.tta else ''} x{up.scale}"
    results: dict[str, list[Row]] = {}
    failed: list[str] = []
    try:
        for root in args.datasets:
            rows, bad = evaluate_dataset(up, root, args)
            failed += bad
            if rows:
                results[root.name] = rows
    except (FileNotFoundError, ValueError) as e:  # a dataset folder without images or without its LR
        return _cli.fail(log, str(e))
    except KeyboardInterrupt:
        return _cli.fail(log, "interrupted: no report written", _cli.INTERRUPTED)
    text = f"# {label} ({args.checkpoint}, {up.precision}, {up.device})\n\n" + "\n".join(
        markdown(name, up.scale, label, rows) for name, rows in results.items())
    print(text)
    meta = dict(checkpoint=str(args.checkpoint), model=label, scale=up.scale, tta=args.tta, precision=up.precision,
                tile=args.tile, config=up.config, failed=failed)
    write_reports(args.output, meta, results, text, args.csv)
    log.info("reports written to %s (metrics.json, metrics.md%s)", args.output, ", metrics.csv" if args.csv else "")
    if failed:
        log.error("%d image(s) failed and are not in the averages:", len(failed))
        for line in failed:
            log.error("  %s", line)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
