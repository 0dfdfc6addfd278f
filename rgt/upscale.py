"""Upscale images with an RGT checkpoint; the model config is read from the checkpoint itself.

    python -m rgt.upscale -i photo.png -o photo_x4.png -m RGT_S_x4.pth
    python -m rgt.upscale -i photos/ -o out/ -m RGT_x2.pth --suffix _x2 --ext webp --tile 512
    torchrun --nproc_per_node=4 -m rgt.upscale -i 'shots/**/*.jpg' -o out/ -m net_g_latest.pth

INPUT is a file, a folder (its images, not recursive) or a quoted glob; OUTPUT a file (one input) or a folder
(same names + --suffix). 16-bit PNGs stay 16-bit, grayscale stays gray, alpha is kept (upscaled with bicubic or
--alpha model), EXIF orientation is applied. Existing outputs are skipped unless --overwrite; writes are
atomic; unreadable inputs are reported and skipped, and the exit status is 1 if any input failed. Under
torchrun each rank takes every WORLD_SIZE-th input on GPU LOCAL_RANK (no communication).
"""

from __future__ import annotations

import argparse
import glob
import logging
import os
import resource
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm import tqdm

from rgt.data.io import IMAGE_EXTENSIONS, ImageReadError, read_image, write_image
from rgt.inference.onnx_tiles import onnx_option_conflicts, onnx_upscaler
from rgt.inference.upscaler import PRECISIONS, Upscaler

log = logging.getLogger("rgt.upscale")

OUTPUT_EXTENSIONS = ("png", "jpg", "webp")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m rgt.upscale", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("-i", "--input", required=True, help="image file, folder, or quoted glob ('dir/**/*.png')")
    p.add_argument("-o", "--output", required=True, type=Path, help="output file (one input) or folder")
    weights = p.add_mutually_exclusive_group(required=True)
    weights.add_argument("-m", "--checkpoint", help=".pth / .safetensors (official, BasicSR, ours)")
    weights.add_argument("--onnx", type=Path, help="instead of -m: an ONNX file from python -m rgt.export, run "
                         "by ONNX Runtime on the CPU in tiles of its input size (rgt.inference.onnx_tiles)")
    p.add_argument("--model", choices=("rgt_s", "rgt"), help="use this preset instead of the detected config")
    p.add_argument("-s", "--scale", type=int, help="check the checkpoint's scale")
    p.add_argument("-t", "--tile", type=int, default=0, help="tile side in input px (0: whole image, default)")
    p.add_argument("--tile-overlap", type=int, default=32, help="input px shared by neighbouring tiles")
    p.add_argument("-x", "--tta", action="store_true", help="average the 8 flips/rotations (RGT+, 8x slower)")
    p.add_argument("-f", "--ext", choices=("auto", *OUTPUT_EXTENSIONS), default="auto",
                   help="output format (auto: as the input)")
    p.add_argument("--suffix", default="", help="appended to output file names (folder output)")
    p.add_argument("--quality", type=int, default=95, help="JPEG / WebP quality")
    p.add_argument("--alpha", choices=("bicubic", "model"), default="bicubic", help="how alpha is upscaled")
    p.add_argument("--precision", choices=PRECISIONS, default="auto", help="auto: bf16 on capable GPUs, else fp32")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: GPU LOCAL_RANK if any, else CPU)")
    p.add_argument("--kernels", choices=("auto", "reference", "fused"), help="default: RGT_KERNELS or auto")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (pays off on many images)")
    p.add_argument("--overwrite", action="store_true", help="redo outputs that exist")
    return p


def collect_inputs(spec: str) -> list[Path]:
    """Image files named by a file, a folder (not recursive) or a glob, sorted."""
    path = Path(spec)
    if path.is_file():
        return [path]
    if path.is_dir():
        candidates = path.iterdir()
    else:
        candidates = (Path(p) for p in glob.glob(spec, recursive=True))
    return sorted(p for p in candidates if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def output_paths(inputs: list[Path], output: Path, ext: str, suffix: str) -> list[Path]:
    """Destination per input: OUTPUT itself for one input and an image-file OUTPUT, else OUTPUT/name."""
    if output.suffix.lower() in IMAGE_EXTENSIONS and not output.is_dir():
        if len(inputs) != 1:
            raise ValueError(f"OUTPUT {output} is a file name but there are {len(inputs)} inputs: give a folder")
        return [output]
    dests = [output / f"{p.stem}{suffix}{p.suffix if ext == 'auto' else '.' + ext}" for p in inputs]
    seen: dict[Path, Path] = {}
    for src, dst in zip(inputs, dests, strict=True):
        if dst in seen:
            raise ValueError(f"{seen[dst]} and {src} would both be written to {dst}: use --ext auto or a suffix")
        if dst.resolve() == src.resolve():
            raise ValueError(f"{dst} would overwrite its input: use another folder or --suffix")
        seen[dst] = src
    return dests


def shard(items: list, rank: int, world: int) -> list:
    """This rank's share under torchrun: every world-th item from position rank."""
    return items[rank::world]


def upscale_file(up: Upscaler, src: Path, dst: Path, quality: int) -> None:
    """Read, upscale and atomically write one image (16-bit kept for PNG; alpha dropped for JPEG)."""
    loaded = read_image(src)
    image, alpha = up.upscale(loaded.image, loaded.alpha)
    is_png = dst.suffix.lower() == ".png"
    if alpha is not None and dst.suffix.lower() in (".jpg", ".jpeg"):
        log.warning("%s: JPEG has no alpha channel; alpha dropped (use --ext png or webp to keep it)", src)
        alpha = None
    write_image(dst, image, alpha=alpha, bit_depth=loaded.bit_depth if is_png else 8, quality=quality)


def peak_memory(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB GPU (torch allocator)"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB (process peak RSS)"


def _default_device(local_rank: int) -> str:
    return f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"


def run(args: argparse.Namespace, jobs: list[tuple[Path, Path]], device: str) -> int:
    """Upscale every (src, dst) job; returns the number of failed inputs."""
    if args.onnx:  # the exported file fixes model, tile size and precision (checked in main)
        up = onnx_upscaler(args.onnx, tile_overlap=args.tile_overlap, tta=args.tta, alpha=args.alpha,
                           progress=True)
    else:
        up = Upscaler(args.checkpoint, model=args.model, scale=args.scale, device=device,
                      precision=args.precision, tile=args.tile, tile_overlap=args.tile_overlap, tta=args.tta,
                      alpha=args.alpha, kernels=args.kernels, compile=args.compile, progress=True)
    mode = "ONNX Runtime, {}x{} px tiles".format(*up.model.tile) if args.onnx else "whole images"
    log.info("x%d model on %s, %s, %s", up.scale, up.device, up.precision,
             f"{args.tile} px tiles" if args.tile else mode)
    failed, times = 0, []
    for src, dst in tqdm(jobs, desc="upscale", unit="img", disable=len(jobs) < 2):
        start = time.perf_counter()
        try:
            upscale_file(up, src, dst, args.quality)
        except ImageReadError as e:
            log.error("failed: %s", e)
            failed += 1
            continue
        except (OSError, ValueError, RuntimeError) as e:  # one bad image must not stop a batch
            log.error("failed: %s: %s: %s", src, type(e).__name__, e)
            failed += 1
            continue
        times.append(time.perf_counter() - start)
    if times:
        log.info("%d upscaled in %.2f s/image (mean; %.2f s max), peak memory %s", len(times),
                 sum(times) / len(times), max(times), peak_memory(up.device))
    return failed


def main(argv: Sequence[str] | None = None) -> int:
    """Returns the exit status: 0, 1 if any input failed, 2 for bad arguments (argparse)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.onnx and (conflict := onnx_option_conflicts(args)):
        parser.error(conflict)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    inputs = collect_inputs(args.input)
    if not inputs:
        parser.error(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found for INPUT {args.input}")
    try:
        dests = output_paths(inputs, args.output, args.ext, args.suffix)
    except ValueError as e:
        parser.error(str(e))
    jobs = shard(list(zip(inputs, dests, strict=True)), rank, world)
    todo = [(s, d) for s, d in jobs if args.overwrite or not d.exists()]
    prefix = f"rank {rank}/{world}: " if world > 1 else ""
    if len(todo) < len(jobs):
        log.info("%sskipping %d existing output(s) (--overwrite to redo them)", prefix, len(jobs) - len(todo))
    failed = run(args, todo, args.device or _default_device(int(os.environ.get("LOCAL_RANK", 0)))) if todo else 0
    if failed:
        log.error("%s%d of %d input(s) failed", prefix, failed, len(todo))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
