"""Upscale images with an RGT checkpoint; the model config is read from the checkpoint itself.

    python -m rgt.upscale -i photo.png -o photo_x4.png -m RGT_S_x4.pth
    python -m rgt.upscale -i photos/ -o out/ -m RGT_x2.pth --suffix _x2 --ext webp --tile 512
    torchrun --nproc_per_node=4 -m rgt.upscale -i 'shots/**/*.jpg' -o out/ -m net_g_latest.pth

INPUT is a file, a folder (its images, not recursive) or a quoted glob; OUTPUT a file (one input) or a folder
(same names + --suffix). 16-bit PNGs stay 16-bit (16-bit colour needs `pip install "rgt[image16]"`), grayscale
stays gray, alpha is kept (upscaled with bicubic or --alpha model), EXIF orientation is applied; of an animated
image only the first frame is upscaled (with a warning). Existing outputs are skipped unless --overwrite; an
output never replaces an input, and inputs that are outputs of this same command (a rerun with -o INPUT
--suffix) are skipped. Writes are atomic, so Ctrl-C (exit status 130) leaves only whole files: rerun to finish.
Unreadable inputs are reported and skipped, and the exit status is then 1; a checkpoint or option that cannot
be used is one error line and status 2. Under torchrun each rank takes every WORLD_SIZE-th input on GPU
LOCAL_RANK (no communication).
"""

from __future__ import annotations

import argparse
import glob
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

from rgt import _cli

log = logging.getLogger("rgt.upscale")

OUTPUT_EXTENSIONS = ("png", "jpg", "webp")


def build_parser() -> argparse.ArgumentParser:
    p = _cli.parser("python -m rgt.upscale", __doc__)
    p.add_argument("-i", "--input", required=True, help="image file, folder, or quoted glob ('dir/**/*.png')")
    p.add_argument("-o", "--output", required=True, type=Path, help="output file (one input) or folder")
    _cli.add_model_options(p, precision="auto", device="GPU LOCAL_RANK if any, else the CPU", tile_unit="input",
                           onnx="instead of -m: an ONNX file from python -m rgt.export, run by ONNX Runtime on the "
                           "CPU in tiles of its input size (rgt.inference.onnx_tiles)")
    p.add_argument("-f", "--ext", choices=("auto", *OUTPUT_EXTENSIONS), default="auto",
                   help="output format (auto: as the input)")
    p.add_argument("--suffix", default="", help="appended to output file names (folder output)")
    p.add_argument("--quality", type=int, default=95, help="JPEG / WebP quality")
    p.add_argument("--alpha", choices=("bicubic", "model"), default="bicubic", help="how alpha is upscaled")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (pays off on many images)")
    p.add_argument("--overwrite", action="store_true", help="redo outputs that exist")
    return p


def collect_inputs(spec: str) -> list[Path]:
    """Image files named by a file, a folder (not recursive) or a glob, sorted."""
    from rgt.data.io import IMAGE_EXTENSIONS

    path = Path(spec)
    if path.is_file():
        return [path]
    if path.is_dir():
        candidates = path.iterdir()
    else:
        candidates = (Path(p) for p in glob.glob(spec, recursive=True))
    return sorted(p for p in candidates if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _destinations(inputs: list[Path], output: Path, ext: str, suffix: str) -> list[Path]:
    from rgt.data.io import IMAGE_EXTENSIONS

    if output.suffix.lower() in IMAGE_EXTENSIONS and not output.is_dir():
        if len(inputs) != 1:
            raise ValueError(f"OUTPUT {output} is a file name but there are {len(inputs)} inputs: give a folder")
        return [output]
    return [output / f"{p.stem}{suffix}{p.suffix if ext == 'auto' else '.' + ext}" for p in inputs]


def plan(inputs: list[Path], output: Path, ext: str, suffix: str) -> tuple[list[Path], list[Path]]:
    """(inputs, destinations): OUTPUT itself for one input and an image-file OUTPUT, else OUTPUT/name.

    Inputs that are the destination of another input (outputs of an earlier run of this command, as with
    `-i d -o d --suffix _x2`) are dropped with a log line, so a rerun never upscales its own outputs.

    Raises:
        ValueError: two inputs map to one file, or an output would replace an input (even with --overwrite).
    """
    dests = _destinations(inputs, output, ext, suffix)
    targets = {d.resolve() for d in dests}
    own = [p for p in inputs if p.resolve() in targets]
    if own and len(own) < len(inputs):
        log.info("skipping %d input(s) that are outputs of this command (%s)", len(own),
                 ", ".join(p.name for p in own[:3]) + (", ..." if len(own) > 3 else ""))
        inputs = [p for p in inputs if p.resolve() not in targets]
        dests = _destinations(inputs, output, ext, suffix)
    seen: dict[Path, Path] = {}
    for src, dst in zip(inputs, dests, strict=True):
        if dst in seen:
            raise ValueError(f"{seen[dst]} and {src} would both be written to {dst}: use --ext auto or a suffix")
        if dst.resolve() == src.resolve():
            raise ValueError(f"{dst} would overwrite its input (even with --overwrite): use another OUTPUT or "
                             "--suffix")
        seen[dst] = src
    return inputs, dests


def shard(items: list, rank: int, world: int) -> list:
    """This rank's share under torchrun: every world-th item from position rank."""
    return items[rank::world]


def upscale_file(up, src: Path, dst: Path, quality: int) -> None:
    """Read, upscale and atomically write one image (16-bit kept for PNG; alpha dropped for JPEG)."""
    from rgt.data.io import read_image, write_image

    loaded = read_image(src)
    image, alpha = up.upscale(loaded.image, loaded.alpha)
    is_png = dst.suffix.lower() == ".png"
    if alpha is not None and dst.suffix.lower() in (".jpg", ".jpeg"):
        log.warning("%s: JPEG has no alpha channel; alpha dropped (use --ext png or webp to keep it)", src)
        alpha = None
    write_image(dst, image, alpha=alpha, bit_depth=loaded.bit_depth if is_png else 8, quality=quality)


def peak_memory(device) -> str:
    import resource

    import torch

    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB GPU (torch allocator)"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB (process peak RSS)"


def _default_device(local_rank: int) -> str:
    import torch

    return f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"


def load_upscaler(args: argparse.Namespace, device: str):
    """The Upscaler of the options. Raises what `rgt.Upscaler` raises for a bad checkpoint or option."""
    from rgt.inference.onnx_tiles import onnx_upscaler
    from rgt.inference.upscaler import Upscaler

    if args.onnx:  # the exported file fixes model, tile size and precision (checked in main)
        overlap = 32 if args.tile_overlap is None else args.tile_overlap
        return onnx_upscaler(args.onnx, tile_overlap=overlap, tta=args.tta, alpha=args.alpha, progress=True)
    return Upscaler(args.checkpoint, model=args.model, scale=args.scale, device=device, precision=args.precision,
                    tile=args.tile, tile_overlap=args.tile_overlap, tta=args.tta, alpha=args.alpha,
                    kernels=args.kernels, compile=args.compile, progress=True)


def run(up, jobs: list[tuple[Path, Path]], quality: int) -> list[tuple[Path, str]]:
    """Upscale every (src, dst) job; returns (input, reason) of each one that failed."""
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    failed, times = [], []
    with logging_redirect_tqdm():  # log lines (through the root logger) above the bars, not glued to them
        for src, dst in tqdm(jobs, desc="upscale", unit="img", disable=len(jobs) < 2, dynamic_ncols=True):
            start = time.perf_counter()
            try:
                upscale_file(up, src, dst, quality)
            except (OSError, ValueError, RuntimeError) as e:  # one bad image must not stop a batch
                reason = str(e) if str(src) in str(e) else f"{type(e).__name__}: {e}"
                log.error("failed: %s", reason if str(src) in reason else f"{src}: {reason}")
                failed.append((src, reason))
                continue
            times.append(time.perf_counter() - start)
    if times:
        log.info("%d upscaled in %.2f s/image (mean; %.2f s max), peak memory %s", len(times),
                 sum(times) / len(times), max(times), peak_memory(up.device))
    return failed


def main(argv: Sequence[str] | None = None) -> int:
    """Returns the exit status: 0; 1 if any input failed; 2 for bad arguments or checkpoint; 130 on Ctrl-C."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.onnx:
        from rgt.inference.onnx_tiles import onnx_option_conflicts

        if conflict := onnx_option_conflicts(args):
            parser.error(conflict)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    inputs = collect_inputs(args.input)
    if not inputs:
        from rgt.data.io import IMAGE_EXTENSIONS

        parser.error(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found for INPUT {args.input}")
    try:
        inputs, dests = plan(inputs, args.output, args.ext, args.suffix)
    except ValueError as e:
        parser.error(str(e))
    jobs = shard(list(zip(inputs, dests, strict=True)), rank, world)
    todo = [(s, d) for s, d in jobs if args.overwrite or not d.exists()]
    prefix = f"rank {rank}/{world}: " if world > 1 else ""
    if len(todo) < len(jobs):
        log.info("%sskipping %d existing output(s) (--overwrite to redo them)", prefix, len(jobs) - len(todo))
    if not todo:
        return 0
    try:
        try:
            up = load_upscaler(args, args.device or _default_device(int(os.environ.get("LOCAL_RANK", 0))))
        except (OSError, ValueError, TypeError, RuntimeError) as e:  # the checkpoint or a model option
            return _cli.fail(log, _cli.checkpoint_error(args.onnx or args.checkpoint, e))
        tiles = f"{up.tile} px tiles (overlap {up.overlap(up.tile)})" if up.tile else "whole images"
        if args.onnx:
            tiles = "ONNX Runtime, {}x{} px tiles".format(*up.model.tile)
        log.info("%sx%d model on %s, %s, %s%s; %d image(s)", prefix, up.scale, up.device, up.precision, tiles,
                 ", TTA x8 (8 passes per image)" if up.tta else "", len(todo))
        failed = run(up, todo, args.quality)
    except KeyboardInterrupt:
        log.error("%sinterrupted: finished outputs are complete; rerun the same command to do the rest", prefix)
        return _cli.INTERRUPTED
    if failed:
        log.error("%s%d of %d input(s) failed:", prefix, len(failed), len(todo))
        for src, reason in failed:
            log.error("  %s", reason if str(src) in reason else f"{src}: {reason}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
