"""Upscale with an exported RGT ONNX file (`python -m rgt.export`) in ONNX Runtime, at any image size.

The file takes one fixed H x W (see `rgt.export`), so images are cut into tiles of exactly that size and
blended with the sin^2 weights of the PyTorch path (`rgt.inference.tiling.tiled_forward`); a tile that the
image cannot fill (an image smaller than the tile) is reflect-padded to the tile size and its output cropped.
`OnnxTiles` looks like an RGT to `rgt.Upscaler` (it has `upscale` and `in_chans`), so gray, alpha,
self-ensemble, input kinds and the padding of tiny images work as with a checkpoint.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
from pathlib import Path

import torch
from torch import Tensor, nn

from rgt.inference.tiling import reflect_pad, tiled_forward
from rgt.inference.upscaler import Upscaler

__all__ = ["OnnxTiles", "onnx_option_conflicts", "onnx_upscaler", "ort_session"]

# rgt.upscale options that an ONNX file fixes itself, with their defaults (--onnx refuses them when set).
_FIXED_BY_FILE = {"model": None, "tile": 0, "precision": "auto", "device": None, "kernels": None, "compile": False}


def ort_session(path: str | os.PathLike, providers: list[str] | None = None):
    """An ONNX Runtime session on `providers` (default: the CPU provider), without ORT's warning noise."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # ORT warns about every constant it cannot fold on the CPU: noise here
    return ort.InferenceSession(str(path), opts, providers=providers or ["CPUExecutionProvider"])


class OnnxTiles(nn.Module):
    """An exported RGT run by ONNX Runtime in tiles of its input size: (B, C, H, W) -> (B, C, sH, sW) float32.

    Args:
        path: the .onnx file. overlap: input px shared by neighbouring tiles; when it is not < tile / 2, a
            quarter of the tile is used (the `Upscaler` rule for small tiles).
        providers: ONNX Runtime execution providers (default: the CPU provider).
        progress: show a progress bar over tiles.
    """

    def __init__(self, path: str | os.PathLike, *, overlap: int = 32, providers: list[str] | None = None,
                 progress: bool = False):
        super().__init__()
        self.session = ort_session(path, providers)
        inp, out = self.session.get_inputs()[0], self.session.get_outputs()[0]
        batch, self.in_chans, th, tw = inp.shape
        if not (isinstance(th, int) and isinstance(tw, int)):
            raise ValueError(f"{path}: the input size {inp.shape} is not fixed; export one with python -m rgt.export")
        meta = self.session.get_modelmeta().custom_metadata_map
        self.upscale = int(meta["scale"]) if "scale" in meta else out.shape[-1] // tw
        self.tile, self.batch = (th, tw), batch if isinstance(batch, int) else None
        self.input_name, self.fp16 = inp.name, inp.type == "tensor(float16)"
        self.overlap = overlap if 2 * overlap < min(th, tw) else min(th, tw) // 4
        self.progress = progress

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, C, H, W) float, H and W >= 16 -> (B, C, sH, sW) float32 on x's device."""
        return tiled_forward(self._tile, x, self.upscale, self.tile, self.overlap, progress=self.progress)

    def _tile(self, t: Tensor) -> Tensor:
        """(B, C, h, w), h, w <= the tile size -> (B, C, s h, s w): padded to the tile, run in batches, cropped."""
        (th, tw), (h, w), s = self.tile, t.shape[-2:], self.upscale
        t = reflect_pad(t, th - h, tw - w)
        step = self.batch or t.shape[0]
        out = torch.cat([self._run(t[i : i + step]) for i in range(0, t.shape[0], step)])
        return out[..., : h * s, : w * s].to(t.device)

    def _run(self, t: Tensor) -> Tensor:
        """One session call; a short last batch is filled up to a fixed batch size by repeating its last image."""
        n = t.shape[0]
        if self.batch is not None and n < self.batch:
            t = torch.cat([t, t[-1:].expand(self.batch - n, -1, -1, -1)])
        x = t.to("cpu", torch.float16 if self.fp16 else torch.float32).contiguous().numpy()
        return torch.from_numpy(self.session.run(None, {self.input_name: x})[0][:n]).float()


def onnx_option_conflicts(args: argparse.Namespace) -> str | None:
    """Why `rgt.upscale --onnx` cannot run with these options (one line), or None when it can."""
    given = [f"--{name}" for name, default in _FIXED_BY_FILE.items() if getattr(args, name) != default]
    if given:
        return (f"{', '.join(given)} cannot be used with --onnx: the ONNX file fixes the model, tile size and "
                "precision, and runs on ONNX Runtime's CPU provider")
    if importlib.util.find_spec("onnxruntime") is None:
        return "--onnx needs onnxruntime: pip install 'rgt[onnx]'"
    if not Path(args.onnx).is_file():
        return f"--onnx {args.onnx}: no such file"
    try:
        scale = OnnxTiles(args.onnx).upscale
    except Exception as e:  # ONNX Runtime raises its own types (InvalidProtobuf, Fail, ...), ours ValueError
        return f"--onnx {args.onnx}: cannot be loaded: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
    if args.scale is not None and args.scale != scale:
        return f"--onnx {args.onnx} is a x{scale} model, but --scale {args.scale} was asked for"
    return None


def onnx_upscaler(path: str | os.PathLike, *, tile_overlap: int = 32, tta: bool = False, alpha: str = "bicubic",
                  providers: list[str] | None = None, progress: bool = False) -> Upscaler:
    """An `rgt.Upscaler` on an exported ONNX file (CPU tensors around ONNX Runtime)."""
    net = OnnxTiles(path, overlap=tile_overlap, providers=providers, progress=progress)
    return Upscaler(net, device="cpu", precision="fp32", tta=tta, alpha=alpha, progress=progress)
