"""Training and validation data: paired HR/LR folders or HR only (LR made with MATLAB-exact bicubic).

Randomness without state: the sampler yields `(index, (seed, rank, position))` and a training sample's crop and
flips come from a generator seeded with that key. Workers keep no RNG state, so a resumed run (sampler restarted
at its position) sees exactly the samples the uninterrupted run would have, whatever the number of workers.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, Sampler

from rgt.data import IMAGE_EXTENSIONS, bicubic_degrade, read_image

SampleKey = tuple[int, tuple[int, int, int]]  # (dataset index, (seed, rank, stream position))
MARGIN = 3  # LR pixels of context around a patch: more than the bicubic kernel's reach (2 LR px)


class DataError(ValueError):
    """A missing, unreadable or unusable image; the message names the file."""


def list_images(folder: str | Path, what: str) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{what} folder not found: {folder}")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in the {what} folder {folder}")
    return files


def _pairs(hr_dir: str, lr_dir: str | None, tmpl: str) -> list[tuple[Path, Path | None]]:
    """(HR, LR) paths; LR = lr_dir / (tmpl.format(HR stem) + HR suffix), BasicSR's folder mode."""
    hrs = list_images(hr_dir, "HR (dataroot_gt)")
    if lr_dir is None:
        return [(p, None) for p in hrs]
    if not Path(lr_dir).is_dir():
        raise DataError(f"LR (dataroot_lq) folder not found: {lr_dir}")
    pairs = []
    for hr in hrs:
        lr = Path(lr_dir) / (tmpl.format(hr.stem) + hr.suffix)
        if not lr.is_file():
            raise DataError(f"LR image missing for {hr}: expected {lr} (filename_tmpl {tmpl!r})")
        pairs.append((hr, lr))
    return pairs


def _read_rgb(path: Path) -> Tensor:
    """(3, H, W) float32 in [0, 1]; gray is repeated to RGB, alpha dropped. Errors name the file."""
    try:
        img = read_image(path).image
    except OSError as exc:
        raise DataError(str(exc)) from exc
    return img.expand(3, -1, -1).contiguous() if img.shape[0] == 1 else img


def _degrade(hr: Tensor, scale: int) -> Tensor:
    """MATLAB bicubic of a float [0, 1] image holding 8-bit values, through uint8 (exact) -> float [0, 1]."""
    hr8 = torch.round(hr * 255).to(torch.uint8)
    return bicubic_degrade(hr8, scale).float() / 255


def _check_pair(hr: Tensor, lr: Tensor, scale: int, hr_path: Path, lr_path: Path) -> Tensor:
    """HR cropped to LR * scale (BasicSR's modcrop of the GT); error if the sizes cannot be a pair."""
    (h, w), (hh, ww) = lr.shape[-2:], hr.shape[-2:]
    if not (h * scale <= hh < (h + 1) * scale and w * scale <= ww < (w + 1) * scale):
        raise DataError(f"{lr_path} is {h}x{w} but {hr_path} is {hh}x{ww}: not a x{scale} pair")
    return hr[:, : h * scale, : w * scale]


def dihedral(x: Tensor, hflip: bool, vflip: bool, transpose: bool) -> Tensor:
    """One of the 8 dihedral transforms of (C, H, W)."""
    if hflip:
        x = x.flip(-1)
    if vflip:
        x = x.flip(-2)
    if transpose:
        x = x.transpose(-1, -2)
    return x.contiguous()


class SRDataset(Dataset):
    """Training: random aligned (LR patch, HR patch) with dihedral augmentation; validation: whole images.

    Items are dicts: `lq` (3, h, w) and `gt` (3, s*h, s*w), float32 in [0, 1], and `name`.

    Args:
        hr_dir, lr_dir: folders; lr_dir None = HR only, LR made on the fly (MATLAB-exact bicubic, from 8 bits).
        scale: SR factor. filename_tmpl: LR name from the HR stem, e.g. "{}x4".
        gt_size: HR patch side (training); the LR patch is gt_size // scale. None: whole images (validation).
        hflip, rot: augmentations (rot = vertical flip and transpose, so all 8 dihedral transforms).
    """

    def __init__(self, hr_dir: str, lr_dir: str | None, scale: int, *, filename_tmpl: str = "{}",
                 gt_size: int | None = None, hflip: bool = True, rot: bool = True):
        if gt_size is not None and (gt_size % scale or gt_size < scale):
            raise DataError(f"gt_size {gt_size} must be a positive multiple of the scale {scale}")
        self.pairs = _pairs(hr_dir, lr_dir, filename_tmpl)
        self.scale, self.gt_size, self.hflip, self.rot = scale, gt_size, hflip, rot

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, key: int | SampleKey) -> dict:
        if self.gt_size is None:
            return self._whole(int(key))
        index, entropy = key
        rng = np.random.default_rng(entropy)
        lq, gt = self._patch(index, rng)
        flips = rng.random(3) < 0.5
        t = (bool(flips[0]) and self.hflip, bool(flips[1]) and self.rot, bool(flips[2]) and self.rot)
        return {"lq": dihedral(lq, *t), "gt": dihedral(gt, *t), "name": self.pairs[index][0].stem}

    def _whole(self, index: int) -> dict:
        hr_path, lr_path = self.pairs[index]
        hr, s = _read_rgb(hr_path), self.scale
        if lr_path is None:
            h, w = hr.shape[-2] // s * s, hr.shape[-1] // s * s
            if h == 0 or w == 0:
                raise DataError(f"{hr_path} ({hr.shape[-2]}x{hr.shape[-1]}) is smaller than the scale {s}")
            hr = hr[:, :h, :w]
            return {"lq": _degrade(hr, s), "gt": hr, "name": hr_path.stem}
        lr = _read_rgb(lr_path)
        return {"lq": lr, "gt": _check_pair(hr, lr, s, hr_path, lr_path), "name": hr_path.stem}

    def _patch(self, index: int, rng: np.random.Generator) -> tuple[Tensor, Tensor]:
        """A random LR patch (p, p) and its HR patch (s*p, s*p)."""
        hr_path, lr_path = self.pairs[index]
        s, p = self.scale, self.gt_size // self.scale
        hr = _read_rgb(hr_path)
        lr = _read_rgb(lr_path) if lr_path is not None else None
        h, w = (lr.shape[-2:] if lr is not None else (hr.shape[-2] // s, hr.shape[-1] // s))
        if h < p or w < p:
            raise DataError(f"{lr_path or hr_path} gives a {h}x{w} LR image, smaller than the {p}x{p} "
                            f"LR patch (gt_size {self.gt_size} / scale {s})")
        top, left = int(rng.integers(0, h - p + 1)), int(rng.integers(0, w - p + 1))
        if lr is not None:
            hr = _check_pair(hr, lr, s, hr_path, lr_path)
            return lr[:, top:top + p, left:left + p], hr[:, s * top:s * (top + p), s * left:s * (left + p)]
        return self._degraded_patch(hr[:, : h * s, : w * s], top, left, p)

    def _degraded_patch(self, hr: Tensor, top: int, left: int, p: int) -> tuple[Tensor, Tensor]:
        """Degrade only the patch plus MARGIN LR pixels (clipped at the image border, where the resize pads the
        same way as for the whole image), so the LR patch equals that of the whole degraded image."""
        s, (h, w) = self.scale, (hr.shape[-2] // self.scale, hr.shape[-1] // self.scale)
        t0, l0 = max(top - MARGIN, 0), max(left - MARGIN, 0)
        t1, l1 = min(top + p + MARGIN, h), min(left + p + MARGIN, w)
        lr = _degrade(hr[:, s * t0:s * t1, s * l0:s * l1], s)
        lq = lr[:, top - t0:top - t0 + p, left - l0:left - l0 + p]
        return lq, hr[:, s * top:s * (top + p), s * left:s * (left + p)]


class InfiniteSampler(Sampler):
    """An endless stream of `(index, (seed, rank, position))` for one rank, like DistributedSampler over epochs.

    Epoch e is a permutation of `enlarge` copies of the dataset (seeded by (seed, e); identical on all ranks),
    padded to a multiple of world and dealt round-robin. `start` skips the first positions (resume).
    """

    def __init__(self, size: int, *, seed: int, rank: int = 0, world: int = 1, shuffle: bool = True,
                 enlarge: int = 1, start: int = 0):
        self.size, self.seed, self.rank, self.world = size, seed, rank, world
        self.shuffle, self.total, self.start = shuffle, size * max(enlarge, 1), start
        self.per_rank = math.ceil(self.total / world)

    def _epoch(self, epoch: int) -> np.ndarray:
        order = (np.random.default_rng((self.seed, epoch)).permutation(self.total) if self.shuffle
                 else np.arange(self.total))
        order = np.resize(order, self.per_rank * self.world)  # pad by wrapping around
        return order[self.rank::self.world] % self.size

    def __iter__(self) -> Iterator[SampleKey]:
        pos, epoch, order = self.start, -1, None
        while True:
            e, k = divmod(pos, self.per_rank)
            if e != epoch:
                epoch, order = e, self._epoch(e)
            yield int(order[k]), (self.seed, self.rank, pos)
            pos += 1

    def __len__(self) -> int:  # DataLoader asks; the stream is endless
        return 2**62
