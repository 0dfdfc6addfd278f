"""What `rgt.upscale` and `rgt.evaluate` share: the model options, the help format, and one-line errors.

Standard library only, so that `--help` answers without importing torch (seconds on a cold start).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
# rgt.ops._dispatch.MODES, not imported so that --help stays torch-free.
KERNEL_MODES = ("auto", "reference", "fused", "portable")
INTERRUPTED = 130  # the shell's status for SIGINT


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The module docstring kept as written, and each option's default shown unless its help says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if "default" in text or default in (None, argparse.SUPPRESS) or default is False or action.required:
            return text
        return f"{text} (default: {action.default!r})" if action.default == "" else f"{text} (default: %(default)s)"


def parser(prog: str, doc: str) -> argparse.ArgumentParser:
    """A parser whose description is the first paragraph of `doc` and whose epilog is the rest."""
    head, _, rest = doc.partition("\n\n")
    return argparse.ArgumentParser(prog=prog, description=head, epilog=rest, formatter_class=HelpFormatter)


def add_model_options(p: argparse.ArgumentParser, *, precision: str, device: str, tile_unit: str,
                      onnx: str | None = None) -> None:
    """-m, --model, -s, -t, --tile-overlap, -x, --precision, --device (default: `device`, in words), --kernels;
    with `onnx` (its help), --onnx as the alternative to -m."""
    weights = p.add_mutually_exclusive_group(required=True) if onnx else p
    weights.add_argument("-m", "--checkpoint", required=not onnx, help=".pth / .safetensors (official, BasicSR, ours)")
    if onnx:
        weights.add_argument("--onnx", type=Path, help=onnx)
    p.add_argument("--model", choices=("rgt_s", "rgt"), help="use this preset instead of the detected config")
    p.add_argument("-s", "--scale", type=int, help="check the checkpoint's scale (default: read from it)")
    p.add_argument("-t", "--tile", type=int, default=0, help=f"tile side in {tile_unit} px (0: whole image)")
    p.add_argument("--tile-overlap", type=int, default=None,
                   help=f"{tile_unit} px shared by neighbouring tiles (default: min(32, tile / 4))")
    p.add_argument("-x", "--tta", action="store_true", help="average the 8 flips/rotations (RGT+, 8x slower)")
    p.add_argument("--precision", choices=PRECISIONS, default=precision,
                   help="auto: bf16 on GPUs that support it, else fp32")
    p.add_argument("--device", help=f"cuda, cuda:1, cpu, auto (default: {device})")
    p.add_argument("--kernels", choices=KERNEL_MODES, default=None, help="default: RGT_KERNELS, else auto")


def checkpoint_error(path: str | Path, exc: BaseException) -> str:
    """One line for a checkpoint or model option that cannot be used, naming the file once."""
    message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return message if str(path) in message else f"{path}: {message}"


def fail(log: logging.Logger, message: str, status: int = 2) -> int:
    """Log `error: message` and return the exit status (2: bad arguments or checkpoint, as argparse)."""
    log.error("error: %s", message)
    return status
