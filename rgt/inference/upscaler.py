"""`rgt.Upscaler`: a loaded RGT plus everything around the forward pass that a user should not have to write.

    up = rgt.Upscaler("RGT_S_x4.pth", device="auto", precision="auto", tile=0)
    big = up(image)        # numpy (H, W[, C]) uint8/uint16/float, PIL image, or tensor (C, H, W) / (B, C, H, W)

Around the model it adds:
- input kinds: the call returns the kind, dtype and layout it was given (uint8 stays uint8, PIL mode kept);
- grayscale: the RGB model runs on the gray plane replicated to RGB, and the three outputs are averaged back to
  one plane (gray in, gray out);
- alpha: upscaled on its own with MATLAB bicubic (default; alpha is usually a smooth or binary mask, and the
  model was trained on natural colour images) or, with alpha="model", by the model like a gray plane;
- sizes: inputs RGT cannot take (a side < 16 px, or a strip too thin for RG-SA's recursion) are reflect-padded
  and the output cropped back;
- precision: "auto" is bf16 autocast on GPUs that support it, else fp32 (fp16 overflows more easily: if a
  reduced-precision output has NaN/Inf, that image is redone in fp32 with a warning, and fp32 is kept);
- tiles: whole image by default (RG-SA is global); `tile=N` runs N x N tiles blended over `tile_overlap`
  (default min(32, N / 4)); on an out-of-memory error (any device: CPU allocator, CUDA, MPS) the tile size is
  halved until it fits (warning), and kept for later images;
- `tta=True`: the x8 self-ensemble (RGT+);
- `progress=True`: a bar over the residual groups of every pass (tiles x TTA), so a long image shows life;
- odd input is refused or flagged: float images must hold [0, 1] (a 0..255 float image is an error, not
  silently clipped), empty images are errors, PIL "F" (float) images come back as "F", and an animated image
  gives a warning: only its first frame is upscaled (as Real-ESRGAN's OpenCV reader does).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Mapping

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn
from tqdm import tqdm

from rgt._cli import PRECISIONS
from rgt.arch import RGT
from rgt.checkpoint import read_checkpoint
from rgt.data.layout import check_unit_range
from rgt.data.resize import imresize
from rgt.detect import build_model, resolve_config
from rgt.inference.tiling import MIN_TILE, pad_to_valid, tile_starts, tiled_forward
from rgt.inference.tta import tta_forward

log = logging.getLogger("rgt.upscale")

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(device: str | torch.device | None) -> torch.device:
    """None / "auto": the first CUDA GPU when there is one, else the CPU."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_precision(precision: str, device: torch.device) -> str:
    """"auto" -> "bf16" on a CUDA GPU that supports it, else "fp32"."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision != "auto":
        return precision
    return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether exc is an out-of-memory error of any device: torch.OutOfMemoryError (CUDA; MPS and XPU in recent
    torch), or the RuntimeError that the CPU allocator ("DefaultCPUAllocator: can't allocate memory") and older
    MPS backends ("MPS backend out of memory") raise."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):  # the same class as torch.OutOfMemoryError (torch >= 2.5)
        return True
    msg = str(exc)
    return isinstance(exc, RuntimeError) and ("can't allocate memory" in msg or "out of memory" in msg)


class Upscaler:
    """Upscale images with an RGT checkpoint. See the module docstring for what happens around the model.

    Args:
        checkpoint: a checkpoint path / state dict (config detected, see `rgt.load_model`) or a built RGT.
        model, scale: `load_model` overrides ("rgt_s" / "rgt"; the scale is checked against the weights).
        device: "cuda", "cuda:1", "cpu", ... or "auto". precision: "auto" | "fp32" | "bf16" | "fp16".
        tile: 0 for whole images, else the tile side in input px. tile_overlap: input px shared by tiles
            (None: min(32, tile / 4)). tta: average the 8 flips/rotations. alpha: "bicubic" or "model".
        kernels: "auto" | "reference" | "fused" (default RGT_KERNELS). compile: torch.compile the model.
        progress: show a progress bar over the residual groups of every pass (tiles x TTA).
    """

    def __init__(
        self,
        checkpoint: str | os.PathLike | Mapping | RGT,
        *,
        model: str | None = None,
        scale: int | None = None,
        device: str | torch.device | None = "auto",
        precision: str = "auto",
        tile: int = 0,
        tile_overlap: int | None = None,
        tta: bool = False,
        alpha: str = "bicubic",
        kernels: str | None = None,
        compile: bool = False,
        progress: bool = False,
    ):
        self.device = resolve_device(device)
        self.precision = resolve_precision(precision, self.device)
        if tile < 0 or 0 < tile < MIN_TILE:
            raise ValueError(f"tile must be 0 (whole image) or >= {MIN_TILE} px, got {tile}")
        if tile and tile_overlap is not None and not 0 <= 2 * tile_overlap < tile:
            raise ValueError(f"tile_overlap must be in [0, tile/2), got {tile_overlap} for tile {tile}")
        if alpha not in ("bicubic", "model"):
            raise ValueError(f"alpha must be 'bicubic' or 'model', got {alpha!r}")
        self.config: dict | None = None  # constructor arguments, when built from a checkpoint
        if isinstance(checkpoint, nn.Module):
            net = checkpoint.to(self.device).eval()
            if kernels is not None:
                net.set_kernels(kernels)
        else:
            sd, stored = read_checkpoint(checkpoint)
            self.config = resolve_config(sd, stored=stored, model=model, scale=scale)
            net = build_model(sd, self.config, self.device, kernels)
        self.model = net
        self.scale, self.in_chans = net.upscale, net.in_chans
        self._net = torch.compile(net, dynamic=True) if compile else net
        self.tile, self.tile_overlap, self.tta, self.alpha, self.progress = tile, tile_overlap, tta, alpha, progress
        self._bar: tqdm | None = None  # the open progress bar of `_run`, ticked once per residual group

    # ------------------------------------------------------------------------------------------- forward

    def _autocast(self):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=_DTYPES[self.precision])

    def _model_call(self, x: Tensor) -> Tensor:
        """(B, in_chans, h, w) of any size -> (B, in_chans, s h, s w) float32, padded for the model."""
        xp, (h, w) = pad_to_valid(x)
        with self._autocast():
            y = self._net(xp)
        if self._bar is not None and self._net is not self.model:  # compiled: no hooks inside, tick per pass
            self._bar.update(len(self.model.layers))
        return y[..., : h * self.scale, : w * self.scale].float()

    def _tiled(self, x: Tensor, tile: int) -> Tensor:
        if tile <= 0 or tile >= max(x.shape[-2:]):
            return self._model_call(x)
        return tiled_forward(self._model_call, x, self.scale, tile, self.overlap(tile))

    def overlap(self, tile: int) -> int:
        """Overlap of `tile` px tiles: the one asked for while it fits (OOM fallback tiles are smaller), else
        min(32, tile / 4)."""
        if self.tile_overlap is not None and 2 * self.tile_overlap < tile:
            return self.tile_overlap
        return min(32, tile // 4)

    def _passes(self, x: Tensor) -> int:
        """Model calls one `_run` of x makes: tiles x TTA transforms."""
        H, W = x.shape[-2:]
        tiles = 1
        if 0 < self.tile < max(H, W):
            th, tw = min(self.tile, H), min(self.tile, W)
            overlap = self.overlap(self.tile)
            tiles = len(tile_starts(H, th, overlap)) * len(tile_starts(W, tw, overlap))
        return tiles * (8 if self.tta else 1)

    def _tick(self, *_) -> None:
        """Forward hook of a residual group (returns None: a hook's return value replaces the output)."""
        self._bar.update(1)

    @contextlib.contextmanager
    def _progress(self, x: Tensor):
        """A bar over the residual groups of all passes of x, ticked by forward hooks (per pass when compiled)."""
        if not self.progress or not hasattr(self.model, "layers"):  # e.g. ONNX tiles: they show their own bar
            yield
            return
        groups = len(self.model.layers)
        self._bar = tqdm(total=self._passes(x) * groups, desc=f"{x.shape[-2]}x{x.shape[-1]}", unit="group",
                         leave=False, dynamic_ncols=True)
        hooks = [] if self._net is not self.model else [
            layer.register_forward_hook(self._tick) for layer in self.model.layers]
        try:
            yield
        finally:
            for h in hooks:
                h.remove()
            self._bar.close()
            self._bar = None

    def _with_oom_fallback(self, x: Tensor) -> Tensor:
        """Whole image (or the set tile); out of memory on any device: halve the tile until it fits, down to
        MIN_TILE."""
        tile, side = self.tile, max(x.shape[-2:])
        while True:
            current = tile if 0 < tile < side else side
            try:
                return self._tiled(x, tile)
            except Exception as exc:
                if not is_out_of_memory(exc) or current // 2 < MIN_TILE:
                    raise
            # Outside the except block: the traceback, which holds the failed pass's activations, is freed.
            tile = current // 2
            log.warning("rgt: %s out of memory on a %dx%d input with %s; retrying with %d px tiles "
                        "(tiling changes the output slightly: RG-SA is global)", x.device.type.upper(),
                        *x.shape[-2:], "the whole image" if current == side else f"{current} px tiles", tile)
            if x.device.type == "cuda":
                torch.cuda.empty_cache()
            elif x.device.type == "mps":
                torch.mps.empty_cache()
            self.tile = tile  # later images start from the size that fitted

    def _run(self, x: Tensor) -> Tensor:
        """(B, in_chans, H, W) on the device -> (B, in_chans, sH, sW) float32, NaN-safe in reduced precision."""
        with torch.inference_mode(), self._progress(x):
            fn = self._with_oom_fallback
            y = tta_forward(fn, x) if self.tta else fn(x)
            if self.precision != "fp32" and not torch.isfinite(y).all():
                log.warning("rgt: %s inference gave NaN/Inf; redoing it in fp32 (and keeping fp32)", self.precision)
                self.precision = "fp32"
                y = tta_forward(fn, x) if self.tta else fn(x)
        return y

    def _planes(self, x: Tensor) -> Tensor:
        """(B, c, H, W) colour or gray planes -> (B, c, sH, sW); gray runs on the RGB model as R = G = B."""
        c = x.shape[1]
        if c == self.in_chans:
            return self._run(x)
        if c == 1:
            return self._run(x.expand(-1, self.in_chans, -1, -1)).mean(1, keepdim=True)
        raise ValueError(f"the model takes {self.in_chans} channel(s) (or 1 gray), got {c}")

    def upscale(self, image: Tensor, alpha: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """Float tensors in [0, 1] -> upscaled float32 tensors in [0, 1] on the input's device.

        Args:
            image: (C, H, W) or (B, C, H, W), C = 3 (RGB) or 1 (gray), any size >= 1 px.
            alpha: optional (1, H, W) / (B, 1, H, W) alpha, upscaled per `self.alpha`.

        Returns:
            (image (…, C, sH, sW), alpha (…, 1, sH, sW) or None), clamped to [0, 1].
        """
        batched = image.ndim == 4
        if image.ndim not in (3, 4) or 0 in image.shape:
            raise ValueError(f"images are (C, H, W) or (B, C, H, W) with no empty dimension, got {tuple(image.shape)}")
        x = (image if batched else image[None]).to(self.device, torch.float32)
        y = self._planes(x).clamp(0, 1)
        a = None
        if alpha is not None:
            a = (alpha if batched else alpha[None]).to(self.device, torch.float32)
            a = self._planes(a) if self.alpha == "model" else imresize(a, self.scale)
            a = a.clamp(0, 1).to(image.device)
            a = a if batched else a[0]
        y = y.to(image.device)
        return (y if batched else y[0]), a

    # ------------------------------------------------------------------------------------------- any input

    def __call__(self, image: np.ndarray | Image.Image | Tensor) -> np.ndarray | Image.Image | Tensor:
        """Upscale one image (or a tensor batch) and return it as the same kind, dtype and channel layout.

        numpy: (H, W) or (H, W, C), C = 1/2/3/4 (gray, gray+alpha, RGB, RGBA), uint8, uint16 or float in [0, 1].
        PIL: modes L, LA, RGB, RGBA, I;16, F (float in [0, 1], kept float), P (comes back as RGB/RGBA); only
        the first frame of an animated image (with a warning). tensor: (C, H, W) or (B, C, H, W), same channel
        meanings, float in [0, 1] or uint8. Float input outside [-0.5, 1.5] (e.g. 0..255) is a ValueError.
        """
        if isinstance(image, Image.Image):
            return _upscale_pil(self, image)
        if isinstance(image, np.ndarray):
            return _upscale_numpy(self, image)
        if isinstance(image, Tensor):
            return _upscale_tensor(self, image)
        raise TypeError(f"Upscaler takes a numpy array, a PIL image or a tensor, got {type(image).__name__}")


def _split_alpha(x: Tensor, channel_dim: int) -> tuple[Tensor, Tensor | None]:
    """2 or 4 channels along channel_dim: colour/gray + alpha."""
    c = x.shape[channel_dim]
    if c in (2, 4):
        return x.narrow(channel_dim, 0, c - 1), x.narrow(channel_dim, c - 1, 1)
    if c in (1, 3):
        return x, None
    raise ValueError(f"images need 1, 2, 3 or 4 channels, got {c}")


def _upscale_tensor(up: Upscaler, t: Tensor) -> Tensor:
    if t.ndim not in (3, 4):
        raise ValueError(f"tensor images are (C, H, W) or (B, C, H, W), got shape {tuple(t.shape)}")
    if t.dtype == torch.uint8:
        return torch.round(_upscale_tensor(up, t.float() / 255) * 255).to(torch.uint8)
    if not t.is_floating_point():
        raise TypeError(f"tensor images must be float in [0, 1] or uint8, got {t.dtype}")
    check_unit_range(t)
    image, alpha = _split_alpha(t, t.ndim - 3)
    y, a = up.upscale(image, alpha)
    return (y if a is None else torch.cat([y, a], dim=t.ndim - 3)).to(t.dtype)


def _upscale_numpy(up: Upscaler, arr: np.ndarray) -> np.ndarray:
    if arr.ndim not in (2, 3):
        raise ValueError(f"numpy images are (H, W) or (H, W, C), got shape {arr.shape}")
    peak = {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0}.get(arr.dtype)
    if peak is None and arr.dtype.kind != "f":
        raise TypeError(f"numpy images must be uint8, uint16 or float in [0, 1], got {arr.dtype}")
    t = torch.from_numpy(np.ascontiguousarray(arr).astype(np.float32) / (peak or 1.0))
    t = t[None] if arr.ndim == 2 else t.permute(2, 0, 1)  # (H, W[, C]) -> (C, H, W)
    y = _upscale_tensor(up, t)
    out = (y[0] if arr.ndim == 2 else y.permute(1, 2, 0)).numpy()
    if peak is None:
        return out.astype(arr.dtype)
    return np.round(out * peak).astype(arr.dtype)


def _upscale_pil(up: Upscaler, im: Image.Image) -> Image.Image:
    if getattr(im, "n_frames", 1) > 1:
        log.warning("rgt: animated image with %d frames: only frame %d is upscaled", im.n_frames, im.tell())
    if im.mode == "F":  # 32-bit float gray: stays float
        return Image.fromarray(_upscale_numpy(up, np.asarray(im, dtype=np.float32)), mode="F")
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode.startswith("I;16") or im.mode == "I":
        out = _upscale_numpy(up, np.asarray(im).astype(np.uint16))
        return Image.fromarray(out)
    if im.mode not in ("L", "LA", "RGB", "RGBA"):
        im = im.convert("RGB")
    return Image.fromarray(_upscale_numpy(up, np.asarray(im)))  # the array shape gives L / LA / RGB / RGBA
